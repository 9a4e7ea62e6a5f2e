"""What the HTTP front door is configured with (the models it serves are http/models.py's): the API keys -
each naming a caller's tenant and what it may do (`ApiKey`).

Three ways to give keys, merged by `ApiConfig.grants` (a key given twice keeps its most specific grant):
- `api_key`: one key, the operator's: admin scope, any priority, may force tracing (tenant "default");
- `api_keys`: key -> tenant name: tenant keys with `ApiKey`'s defaults (no admin, priority up to 0, no rate limit);
- `keys`: key -> `ApiKey`, the full grant (the keys file, `disagg serve --api-keys-file`, http/keys.py).

Without any key the front door is open to whoever reaches it, so it only serves a loopback address unless the
operator says `--insecure` (`check_exposure`), and `/admin/*` answers loopback clients only (http/keys.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from disagg.errors import InsecureExposure
from disagg.http.file_store import FileStoreConfig
from disagg.http.response_store import ResponseStoreConfig
from disagg.isolation import DEFAULT_TENANT, IsolationConfig
from disagg.vision.images import ImageLimits

MAX_PRIORITY = 100  # the API's priority range is [-100, 100] (http/schemas.py, http/inputs.py)
LOOPBACK_NAMES = ("localhost",)


@dataclass
class ApiKey:
    """One key's grant. `requests_per_s` 0: no rate limit; otherwise a token bucket of `burst` requests (0: one
    second's worth, at least 1) refilled at `requests_per_s`."""

    tenant: str
    max_priority: int = 0  # a request's `priority` above it is refused (403 priority_not_allowed)
    admin: bool = False  # may call /admin/* (role changes, planner state)
    requests_per_s: float = 0.0
    burst: int = 0
    may_force_trace: bool = False  # a client's sampled `traceparent` is followed (else the router's sampling)
    metrics: bool = False  # may read /metrics (a Prometheus scraper's key); an admin key may too


@dataclass
class AgentConfig:
    """What the front door does for agent turns on its own, without hints."""

    tool_turn_retention_s: float = field(
        default=300.0,
        metadata={
            "help": "a session's turn that offers tools keeps its KV (prompt and output) in the serving worker's "
            "CPU tier for this long, so it survives the tool call's wait; 0: only when asked (kv_retention, hints)"
        },
    )


@dataclass
class IdleConfig:
    """Models that sleep when nobody asks for them and wake when somebody does (http/idle.py)."""

    sleep_after_idle_s: float = field(
        default=0.0,
        metadata={
            "help": "a model with no request for this long and none running sleeps (its workers give their KV memory "
            "back, weights kept) and wakes on its next request; 0: never"
        },
    )
    wake_on_request: bool = field(
        default=False,
        metadata={
            "help": "a request for an asleep model wakes it and waits for it, instead of a 503 model_unavailable "
            "(always on with --sleep-after-idle-s)"
        },
    )
    wake_timeout_s: float = 30.0  # a request waits this long for its model's wake (or a sleep under way to end)
    # an idle sleep's drain and its workers' answers, at most (an operator's sleep waits model_drain_timeout_s): a
    # worker that holds a lease does not keep the model unavailable for minutes; the sleep fails, the model serves
    # and its idle clock starts again
    sleep_timeout_s: float = 5.0
    check_interval_s: float = 1.0  # how often idle models are looked for

    @property
    def wakes(self) -> bool:
        return self.wake_on_request or self.sleep_after_idle_s > 0


@dataclass
class ApiConfig:
    """The front door's settings for every model it serves (the models themselves: http/models.py)."""

    api_key: str | None = None  # the operator's key (admin)
    api_keys: dict[str, str] | None = None  # key -> tenant name (tenant keys)
    keys: dict[str, ApiKey] | None = None  # key -> full grant (the keys file)
    disconnect_poll_s: float = 0.25
    isolation: IsolationConfig = field(default_factory=IsolationConfig)  # cache salts: tenants, share groups
    responses: ResponseStoreConfig = field(default_factory=ResponseStoreConfig)  # previous_response_id's store
    files: FileStoreConfig = field(default_factory=FileStoreConfig)  # the Files API's uploads
    agents: AgentConfig = field(default_factory=AgentConfig)
    model_drain_timeout_s: float = 300.0  # DELETE /admin/models/{id}: its requests in flight may finish this long
    model_drain_poll_s: float = 0.05
    worker_sleep_timeout_s: float = 30.0  # POST /admin/models/{id}/sleep or /wake: one worker's answer
    idle: IdleConfig = field(default_factory=IdleConfig)  # sleep when idle, wake on a request
    images: ImageLimits = field(default_factory=ImageLimits)  # image_url parts: sizes, counts, remote fetching

    def grants(self) -> dict[str, ApiKey]:
        """Every configured key with its grant; empty: no keys (the open, loopback-only mode)."""
        out: dict[str, ApiKey] = {}
        if self.api_key:
            out[self.api_key] = operator_key()
        for key, tenant in (self.api_keys or {}).items():
            out[key] = ApiKey(tenant)
        out.update(self.keys or {})
        return out


def operator_key() -> ApiKey:
    return ApiKey(DEFAULT_TENANT, max_priority=MAX_PRIORITY, admin=True, may_force_trace=True)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, has_keys: bool, insecure: bool) -> None:
    """Refuse to serve a non-loopback address without API keys, unless the operator insists (`--insecure`)."""
    if has_keys or insecure or is_loopback(host):
        return
    raise InsecureExposure(
        f"refusing to serve on {host} without API keys: anyone who reaches it could drive the cluster "
        "(/admin role changes, any priority). Give --api-key KEY or --api-keys-file FILE, bind 127.0.0.1, "
        "or pass --insecure to serve it open anyway."
    )
