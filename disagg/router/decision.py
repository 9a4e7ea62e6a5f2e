"""A routing decision: the workers a request goes to and why (router/policy.py makes it), with what the router
predicted for it, as the flight, the load book, /metrics and spans read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from disagg.protocol import PricedFrom
from disagg.router.index import TierMatch


@dataclass
class Decision:
    decode_worker: str
    prefill_worker: str | None  # None: prefill on the decode worker
    overlap_blocks: int  # cached prefix blocks the decode worker serves from (any tier)
    costs: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    match: TierMatch = field(default_factory=TierMatch)  # the decode worker's match, per tier
    peer_worker: str | None = None  # pull this worker's cached prefix instead of recomputing it
    peer_blocks: int = 0
    prefill_cached_blocks: int = 0  # what the index says the chosen prefill worker holds of the prompt
    predicted_ttft_s: float | None = None  # the chosen option's predicted time to first token (placement.py)
    ttft_factor: float = 1.0  # the correction in it (router/correction.py): the model's own is predicted / factor
    ttft_measured: bool = False  # that option priced from its worker's own measurements (so its outcome teaches)
    priced_from: PricedFrom | None = None
    flexible: bool = False  # the decode worker is a prefill worker serving this request whole (placement.py)

    def span_attributes(self) -> dict[str, Any]:
        """The decision as attributes of the request's `router.route` span."""
        return {
            "disagg.decode_worker": self.decode_worker,
            "disagg.prefill_worker": self.prefill_worker or "",
            "disagg.peer_worker": self.peer_worker or "",
            "disagg.reason": self.reason,
            "disagg.cached_blocks.device": self.match.device,
            "disagg.cached_blocks.cpu": self.match.cpu,
            "disagg.cached_blocks.disk": self.match.disk,
        }

    def predicted_cached_tokens(self, num_tokens: int, block_size: int) -> int:
        """Prompt tokens the router expects the computing worker to find cached (the engine always computes at
        least the last token)."""
        blocks = self.prefill_cached_blocks if self.prefill_worker else max(self.match.total, self.peer_blocks)
        return min(blocks * block_size, num_tokens - 1)


def as_match(value: TierMatch | int | None) -> TierMatch:
    if isinstance(value, TierMatch):
        return value
    return TierMatch(device=value or 0, exportable=value or 0)
