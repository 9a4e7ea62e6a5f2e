"""What the HTTP front door is configured with: the served model's name and context length, and the API keys
that name a caller's tenant."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.isolation import IsolationConfig


@dataclass
class ApiConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None  # one key for everyone (tenant "default")
    api_keys: dict[str, str] | None = None  # key -> tenant name
    disconnect_poll_s: float = 0.25
    isolation: IsolationConfig = field(default_factory=IsolationConfig)  # cache salts: tenants, share groups

    def tenant_of(self, authorization: str, tenant_header: str | None) -> str | None:
        """The caller's tenant, or None if the key is wrong. Without configured keys the X-Tenant-ID header
        (or "default") names it."""
        key = authorization[7:] if authorization.startswith("Bearer ") else None
        if self.api_keys:
            return self.api_keys.get(key or "")
        if self.api_key:
            return "default" if key == self.api_key else None
        return tenant_header or "default"
