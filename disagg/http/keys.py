"""Who is calling and what it may do: an API key -> `Caller` (tenant, admin scope, priority cap, tracing right),
the admin gate and the per-key rate limit. Pure: no HTTP here (http/auth.py is the middleware that asks).

- Keys are compared in constant time: the presented key's SHA-256 against every configured key's with
  `hmac.compare_digest`, all of them, with no early exit and no dict lookup whose timing depends on the key.
- With keys configured, identity comes from the key only: `X-Tenant-ID` is ignored. Without keys (the open mode,
  served on loopback unless --insecure), `X-Tenant-ID` names the tenant as before, and /admin/* answers only
  loopback clients.
- /metrics (worker names, routing and queue counts, hashed tenants) is read with a key that has the `metrics` or
  the admin scope (a tenant key is refused: 403 `metrics_scope_required`); without keys, from loopback only.
- Rate limit: a token bucket per key (`ApiKey.requests_per_s`, `burst`); an empty bucket is `RateLimited` (429
  with Retry-After: when the next token is due).

The keys file (`disagg serve --api-keys-file FILE`) is JSON, key -> grant, where a grant is a tenant name (the
older `--api-keys` format) or an object with `ApiKey`'s fields:

    {"sk-ops-...": {"tenant": "ops", "admin": true, "max_priority": 100, "may_force_trace": true},
     "sk-prometheus-...": {"tenant": "monitoring", "metrics": true},
     "sk-alice-...": {"tenant": "alice", "max_priority": 10, "requests_per_s": 5, "burst": 20},
     "sk-bob-...": "bob"}
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagg.errors import Forbidden, RateLimited, Unauthorized
from disagg.http.config import MAX_PRIORITY, ApiKey, is_loopback
from disagg.isolation import DEFAULT_TENANT

BEARER = "Bearer "


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool
    max_priority: int
    may_force_trace: bool


class TokenBucket:
    def __init__(self, requests_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = requests_per_s
        self.capacity = float(burst or max(1, math.ceil(requests_per_s)))
        self.tokens, self.clock = self.capacity, clock
        self.last = clock()

    def take(self) -> float:
        """Take one token: 0.0 when there was one, else the seconds until one is due (nothing taken)."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class _Entry:
    digest: bytes
    grant: ApiKey
    bucket: TokenBucket | None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, grants: dict[str, ApiKey], clock: Callable[[], float] = time.monotonic) -> None:
        self._entries = [
            _Entry(_digest(k), g, TokenBucket(g.requests_per_s, g.burst, clock) if g.requests_per_s > 0 else None)
            for k, g in grants.items()
        ]

    @property
    def keyed(self) -> bool:
        return bool(self._entries)

    def _find(self, key: str) -> _Entry | None:
        digest, found = _digest(key), None
        for entry in self._entries:  # every key, whatever matched: the time does not depend on which
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found

    def admit(
        self,
        authorization: str,
        tenant_header: str | None,
        admin_path: bool,
        client_host: str | None,
        *,
        metrics_path: bool = False,
    ) -> Caller:
        """The caller of one /v1/*, /admin/* or /metrics request, or the error that refuses it (Unauthorized,
        Forbidden, RateLimited)."""
        if not self._entries:
            local = bool(client_host and is_loopback(client_host))
            for guarded, path in ((admin_path, "admin"), (metrics_path, "metrics")):
                if guarded and not local:
                    raise Forbidden(
                        f"/{path} is only reachable from loopback when no API keys are configured",
                        code=f"{path}_loopback_only",
                    )
            return Caller(tenant_header or DEFAULT_TENANT, admin=local, max_priority=MAX_PRIORITY, may_force_trace=True)
        key = authorization[len(BEARER) :] if authorization.startswith(BEARER) else ""
        entry = self._find(key)
        if entry is None:
            raise Unauthorized("invalid or missing API key", code="invalid_api_key")
        grant = entry.grant
        if admin_path and not grant.admin:
            raise Forbidden("this API key has no admin scope", code="admin_required")
        if metrics_path and not (grant.metrics or grant.admin):
            raise Forbidden("this API key may not read /metrics", code="metrics_scope_required")
        if entry.bucket is not None and (wait := entry.bucket.take()) > 0:
            raise RateLimited(f"rate limit of {grant.requests_per_s:g} requests/s reached", retry_after_s=wait)
        return Caller(grant.tenant, grant.admin, grant.max_priority, grant.may_force_trace)


def check_priority(caller: Caller, priority: int) -> None:
    if priority > caller.max_priority:
        raise Forbidden(
            f"priority {priority} is above this API key's max_priority {caller.max_priority}",
            param="priority",
            code="priority_not_allowed",
        )


def load_keys_file(path: str | Path) -> dict[str, ApiKey]:
    """The keys file (JSON, see the module's doc): key -> ApiKey. A malformed file is a ValueError naming it."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping API keys to grants")
    # a bad entry is named by its position, never by its key (error messages end up in logs)
    return {key: _grant(grant, f"{path}: entry {i}") for i, (key, grant) in enumerate(data.items())}


def _grant(value: object, where: str) -> ApiKey:
    if isinstance(value, str):
        return ApiKey(value)
    if not isinstance(value, dict) or not isinstance(value.get("tenant"), str):
        raise ValueError(f"{where}: a grant is a tenant name or an object with a 'tenant'")
    kinds = {f.name: str if f.default is dataclasses.MISSING else type(f.default) for f in dataclasses.fields(ApiKey)}
    for name, v in value.items():
        kind = kinds.get(name)
        # bool is an int in Python: a field's kind must match exactly (a float field takes an int too)
        ok = kind is not None and (type(v) is kind or (kind is float and type(v) is int))
        if not ok:
            raise ValueError(f"{where}: bad field {name}={v!r} (fields: {sorted(kinds)})")
    fields: dict[str, Any] = {k: float(v) if kinds[k] is float else v for k, v in value.items()}
    return ApiKey(**fields)
