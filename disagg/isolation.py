"""Tenant isolation of the prefix cache, sessions and metrics (pure: no Ray, no HTTP).

Block hashes are chained (protocol.hash_block_tokens), so salting the first block's parent changes every hash of
the chain: a request's blocks only match blocks written under the same salt, on the engines' prefix caches, the
CPU / disk tiers and the router's KV index alike.  A request's salt, by precedence:
  * the client's `cache_salt` (vLLM's request field): requests that send the same salt share hits, whoever sends it;
  * the tenant's share group (`share_groups`: tenant -> group): the tenants of one group share hits;
  * the tenant itself: no hit and no `cached_tokens` crosses tenants;
  * none for the default tenant (no key, no X-Tenant-ID): its hashes are exactly the unsalted ones of before.
The three kinds hash in separate domains, so a client's salt can never name a tenant's or a group's chain.
With several models in one deployment (models/deployment.py), the model's id wraps whichever salt applies
(`model_salted`), so two models' chains never meet either, whatever the tenants; a LoRA adapter wraps it once
more (`adapter_salted`, applied by protocol.Request.hash_salt on the workers and in the router alike).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

DEFAULT_TENANT = "default"  # the tenant of a caller with no key and no X-Tenant-ID
_SALT_DOMAIN = b"disagg-salt-v1\x00"
_LABEL_DOMAIN = b"disagg-tenant-label-v1\x00"
LABEL_HEX_DIGITS = 12  # 48 bits: no collisions among any realistic number of tenants


class SaltKind(str, enum.Enum):
    CLIENT = "client"  # the request's own cache_salt
    GROUP = "group"  # a configured share group
    TENANT = "tenant"  # the tenant alone
    MODEL = "model"  # a model of a multi-model deployment, around one of the above (or none)
    ADAPTER = "adapter"  # a LoRA adapter (name and directory), around all of the above


@dataclass(frozen=True)
class CacheSalt:
    kind: SaltKind
    name: str

    def wire(self) -> str:
        """The salt as a Request carries it (its kind keeps the domains apart)."""
        return f"{self.kind.value}\x00{self.name}"


def model_salted(namespace: str, salt: str | None) -> str | None:
    """`salt` within a model's namespace ("" : a single-model deployment, `salt` as it is)."""
    if not namespace:
        return salt
    return CacheSalt(SaltKind.MODEL, f"{namespace}\x01{salt or ''}").wire()


def adapter_salted(salt: str | None, name: str, path: str, digest: str) -> str:
    """`salt` for a request that runs with a LoRA adapter: its KV is the adapter's, never the base model's."""
    return CacheSalt(SaltKind.ADAPTER, f"{name}\x01{path}\x01{digest}\x01{salt or ''}").wire()


def salt_root(salt: str | None) -> int | None:
    """The parent hash a salted chain's first block hashes against (None: unsalted, the original chain)."""
    if salt is None:
        return None
    return int.from_bytes(hashlib.blake2b(_SALT_DOMAIN + salt.encode(), digest_size=8).digest(), "little")


@dataclass
class IsolationConfig:
    share_groups: dict[str, str] = field(default_factory=dict)  # tenant -> share group (tenants sharing hits)

    def cache_salt(self, tenant: str | None, requested: str | None = None) -> str | None:
        """A request's salt (see the module docstring); None leaves its hashes unsalted."""
        if requested:
            return CacheSalt(SaltKind.CLIENT, requested).wire()
        if tenant is None or tenant == DEFAULT_TENANT:
            return None
        group = self.share_groups.get(tenant)
        return CacheSalt(SaltKind.GROUP, group).wire() if group else CacheSalt(SaltKind.TENANT, tenant).wire()


class SessionKey(NamedTuple):
    """A session as the router remembers it: one tenant's session id never names another tenant's session."""

    tenant: str | None
    session: str


@dataclass(frozen=True)
class AdapterKey:
    """Requests of one LoRA adapter as the router's affinity table remembers them (never equal to a SessionKey)."""

    name: str
    path: str


Affinity = SessionKey | AdapterKey | str  # what a routing decision sticks to (str: the simulator's sessions)


def affinity(tenant: str | None, session: str | None, adapter: tuple[str, str] | None) -> Affinity | None:
    """What a request should stick to: its session (a tenant's sessions are its own), else its LoRA adapter (name,
    directory) - the worker that last ran an adapter most likely still holds it loaded (engine/lora.py's LRU)."""
    if session:
        return SessionKey(tenant, session)
    return AdapterKey(*adapter) if adapter is not None else None


def scoped_tenant(tenant: str | None) -> str | None:
    """The tenant a request's sessions and pins are namespaced by (None for the default tenant)."""
    return None if tenant is None or tenant == DEFAULT_TENANT else tenant


def tenant_label(tenant: str) -> str:
    """A tenant as /metrics names it: a stable short hash, so a scrape does not list who the customers are (an
    operator maps a known name with this function); the default tenant keeps its name."""
    if tenant == DEFAULT_TENANT:
        return tenant
    return "t" + hashlib.blake2b(_LABEL_DOMAIN + tenant.encode(), digest_size=8).hexdigest()[:LABEL_HEX_DIGITS]
