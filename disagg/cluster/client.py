"""DisaggClient: drive a LocalCluster from Python without the HTTP router (tests, notebooks).

The same RouterCore the router actor runs, over Ray handles, with the round-robin policy and no health
supervisor: requests go through a prefill worker (if any) and a decode worker, with the same fallbacks and
migration; cancelling the async iterator aborts the request on the decode worker and releases the prefill
worker's lease.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from disagg.cluster.handles import RayWorkerHandle
from disagg.protocol import Request, TokenDelta
from disagg.router.policy import PolicyConfig, PolicyKind
from disagg.router.router import RouterCore


class DisaggClient:
    def __init__(
        self, prefill_workers: dict[str, Any], decode_workers: dict[str, Any], policy: PolicyConfig | None = None
    ) -> None:
        if not decode_workers:
            raise ValueError("at least one decode (or aggregated) worker is needed")
        self.core = RouterCore(
            {n: RayWorkerHandle(n, a) for n, a in prefill_workers.items()},
            {n: RayWorkerHandle(n, a) for n, a in decode_workers.items()},
            policy or PolicyConfig(kind=PolicyKind.ROUND_ROBIN, min_remote_prefill_tokens=0),
        )

    def generate(self, request: Request) -> AsyncIterator[TokenDelta]:
        return self.core.generate(request)

    async def complete(self, request: Request) -> tuple[list[int], str, str]:
        """Collect a whole completion: (token ids, text, finish reason)."""
        return await collect(self.generate(request))


async def collect(deltas: AsyncIterator[TokenDelta]) -> tuple[list[int], str, str]:
    tokens, text, reason = [], "", ""
    async for delta in deltas:
        tokens += delta.token_ids
        text += delta.text
        reason = delta.finish_reason or reason
    return tokens, text, reason
