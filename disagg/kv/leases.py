"""Leases: blocks an owner holds for another worker to read (a finished prefill, or a prefix it offers).

A lease ends when the reader's NIXL notification names it (`release`), or when it expires (the reader
vanished).  A lease may mix device blocks (freed on release) and CPU-tier slots (unreferenced on release);
`regions[i]` says which `block_ids[i]` is.  The KV connector owns the table (its export side, kv/connector.py);
the reading side is the same connector on the other worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from disagg.kv.seam import BlockPool
from disagg.protocol import Tier


@dataclass
class Lease:
    block_ids: list[int]
    num_tokens: int  # tokens whose KV the blocks hold
    deadline: float
    regions: list[Tier] = field(default_factory=list)


class LeaseTable:
    def __init__(
        self, pool: BlockPool, timeout_s: float, release_cpu: Callable[[list[int]], None] | None = None
    ) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.release_cpu = release_cpu
        self.leases: dict[str, Lease] = {}
        self.num_expired = 0

    def hold(self, request_id: str, block_ids: list[int], num_tokens: int, regions: list[Tier] | None = None) -> None:
        if request_id in self.leases:  # a second offer under the same id replaces the first
            self.release(request_id)
        regions = regions or [Tier.DEVICE] * len(block_ids)
        self.leases[request_id] = Lease(list(block_ids), num_tokens, time.monotonic() + self.timeout_s, regions)

    def release(self, request_id: str) -> bool:
        lease = self.leases.pop(request_id, None)
        if lease is None:
            return False
        device = [b for b, r in zip(lease.block_ids, lease.regions) if r is Tier.DEVICE]
        cpu = [b for b, r in zip(lease.block_ids, lease.regions) if r is Tier.CPU]
        self.pool.free(device)
        if cpu and self.release_cpu is not None:
            self.release_cpu(cpu)
        return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        expired = [rid for rid, lease in self.leases.items() if lease.deadline <= now]
        for rid in expired:
            self.release(rid)
        self.num_expired += len(expired)
        return expired
