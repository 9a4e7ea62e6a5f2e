"""KV handoff between a prefill engine and a decode engine (the scheduler side of the KV connector).

Prefill side: a finished `hold_kv` request's blocks move into a `Lease` instead of being freed; the lease ends
when the decode side's read completes (`release`) or when it expires (the reader vanished).
Decode side: `plan_import` reserves destination blocks for a remotely prefilled prompt - locally cached prefix
blocks are reused, only the rest are read - and `commit_import` / `abort_import` end the transfer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from disagg.engine.block_pool import BlockPool
from disagg.engine.sequence import Sequence


@dataclass
class Lease:
    block_ids: list[int]
    num_tokens: int  # tokens whose KV the blocks hold (the prompt)
    deadline: float


class LeaseTable:
    def __init__(self, pool: BlockPool, timeout_s: float) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.leases: dict[str, Lease] = {}
        self.num_expired = 0

    def hold(self, request_id: str, block_ids: list[int], num_tokens: int) -> None:
        self.leases[request_id] = Lease(block_ids, num_tokens, time.monotonic() + self.timeout_s)

    def release(self, request_id: str) -> bool:
        lease = self.leases.pop(request_id, None)
        if lease is None:
            return False
        self.pool.free(lease.block_ids)
        return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        expired = [rid for rid, lease in self.leases.items() if lease.deadline <= now]
        for rid in expired:
            self.release(rid)
        self.num_expired += len(expired)
        return expired


@dataclass
class ImportPlan:
    """Read remote_blocks[i] into local_blocks[i]; `num_local_hit_blocks` leading blocks were already here."""

    request_id: str
    remote_blocks: list[int]
    local_blocks: list[int]
    num_local_hit_blocks: int


def plan_import(seq: Sequence, pool: BlockPool, remote_block_ids: list[int]) -> ImportPlan:
    """Reserve every prompt block for `seq` (prefix hits + fresh blocks); raises NoFreeBlocksError if short."""
    bs = seq.block_size
    num_blocks = -(-seq.num_prompt_tokens // bs)
    if len(remote_block_ids) != num_blocks:
        raise ValueError(f"prefill sent {len(remote_block_ids)} blocks for a {seq.num_prompt_tokens}-token prompt")
    seq.update_block_hashes()
    full_prompt_blocks = seq.num_prompt_tokens // bs
    hits = pool.lookup_prefix(seq.block_hashes[:full_prompt_blocks])
    pool.touch(hits)
    try:
        fresh = pool.allocate(num_blocks - len(hits))
    except Exception:
        pool.free(hits)
        raise
    seq.block_ids = hits + fresh
    seq.num_registered_blocks = len(hits)
    seq.num_cached_tokens = len(hits) * bs
    return ImportPlan(seq.request_id, remote_block_ids[len(hits):], fresh, len(hits))
