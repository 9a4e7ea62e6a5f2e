"""Prefix index: which worker holds which KV block, in which tier, fed by the workers' KV events.

Because block hashes are chained, holding block i's hash implies holding its whole prefix, so a request's match
on a worker is read off the leading run of its block hashes.  A worker serves that run the way its engine
does: first the blocks its device cache holds, then - from the first block missing there - blocks its CPU tier
or disk tier holds; `match` returns that split per worker (`TierMatch`), plus how much of it another worker
could read out of it (device + CPU, the regions registered with NIXL).  Each worker's events carry sequence
numbers; a gap (or a restart, seq_no back to 0) makes `apply` return False and the caller asks that worker for a
snapshot.  Memory is bounded by `max_blocks` entries: past it, the oldest-stored hashes are dropped (the index
may under-report, never over-report a hit).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from disagg.protocol import EventKind, KVEventBatch, Tier

_BIT = {Tier.DEVICE: 1, Tier.CPU: 2, Tier.DISK: 4}
_OFFLOAD = _BIT[Tier.CPU] | _BIT[Tier.DISK]


@dataclass
class TierMatch:
    """Leading blocks of a request a worker holds: `device` first, then `cpu` / `disk` blocks."""

    device: int = 0
    cpu: int = 0
    disk: int = 0
    exportable: int = 0  # leading blocks a peer could read (device run + CPU run before any disk block)

    @property
    def total(self) -> int:
        return self.device + self.cpu + self.disk


@dataclass
class IndexedWorker:
    last_seq_no: int = -1
    needs_snapshot: bool = False
    blocks: dict[int, int] = field(default_factory=dict)  # hash -> tier bits


class PrefixIndex:
    def __init__(self, max_blocks: int = 2_000_000) -> None:
        self.max_blocks = max_blocks
        self._owners: OrderedDict[int, dict[str, int]] = OrderedDict()  # hash -> {worker: tier bits}
        self._workers: dict[str, IndexedWorker] = {}

    # ------------------------------------------------------------------ updates
    def add_worker(self, worker: str) -> None:
        self._workers.setdefault(worker, IndexedWorker())

    def remove_worker(self, worker: str) -> None:
        state = self._workers.pop(worker, None)
        if state:
            for h in state.blocks:
                self._drop_all(h, worker)

    def has_worker(self, worker: str) -> bool:
        return worker in self._workers

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply a batch; False (and nothing applied) if a gap means the caller must fetch a snapshot."""
        state = self._workers.setdefault(batch.worker, IndexedWorker())
        if batch.snapshot:
            self._clear(batch.worker, None)
            for event in batch.kv_events():
                self._store(batch.worker, event.block_hashes, event.tier)
            state.last_seq_no = batch.seq_no
            state.needs_snapshot = False
            return True
        if state.needs_snapshot or batch.seq_no != state.last_seq_no + 1:
            state.needs_snapshot = True
            return False
        state.last_seq_no = batch.seq_no
        for event in batch.kv_events():
            if event.kind is EventKind.STORED:
                self._store(batch.worker, event.block_hashes, event.tier)
            elif event.kind is EventKind.REMOVED:
                for h in event.block_hashes:
                    self._drop(h, batch.worker, _BIT[event.tier])
            elif event.kind is EventKind.CLEARED:
                self._clear(batch.worker, event.tier)
        return True

    def _store(self, worker: str, hashes: list[int], tier: Tier) -> None:
        bit = _BIT[tier]
        blocks = self._workers[worker].blocks
        for h in hashes:
            owners = self._owners.get(h)
            if owners is None:
                if len(self._owners) >= self.max_blocks:
                    self._evict_oldest()
                owners = self._owners[h] = {}
            owners[worker] = owners.get(worker, 0) | bit
            blocks[h] = owners[worker]

    def _drop(self, h: int, worker: str, bit: int) -> None:
        owners = self._owners.get(h)
        if owners is None or worker not in owners:
            return
        left = owners[worker] & ~bit
        state = self._workers.get(worker)
        if left:
            owners[worker] = left
            if state is not None:
                state.blocks[h] = left
            return
        self._drop_all(h, worker)

    def _drop_all(self, h: int, worker: str) -> None:
        state = self._workers.get(worker)
        if state is not None:
            state.blocks.pop(h, None)
        owners = self._owners.get(h)
        if owners is not None:
            owners.pop(worker, None)
            if not owners:
                del self._owners[h]

    def _evict_oldest(self) -> None:
        h, owners = self._owners.popitem(last=False)
        for worker in owners:
            self._workers[worker].blocks.pop(h, None)

    def _clear(self, worker: str, tier: Tier | None) -> None:
        bit = 7 if tier is None else _BIT[tier]
        for h in list(self._workers[worker].blocks):
            self._drop(h, worker, bit)

    # ------------------------------------------------------------------ queries
    def needs_snapshot(self, worker: str) -> bool:
        state = self._workers.get(worker)
        return state is None or state.needs_snapshot

    def match(self, block_hashes: list[int]) -> dict[str, TierMatch]:
        """Per worker holding the first block, how its engine would serve the leading blocks (see TierMatch)."""
        matches: dict[str, TierMatch] = {}
        if not block_hashes:
            return matches
        first = self._owners.get(block_hashes[0])
        if not first:
            return matches
        active = dict(first)  # worker -> bits of the current block
        in_tier_phase: set[str] = set()
        cpu_run_open = set(active)  # still counting exportable blocks (no disk block seen yet)
        for worker in active:
            matches[worker] = TierMatch()
        for i, h in enumerate(block_hashes):
            owners = first if i == 0 else self._owners.get(h)
            if not owners:
                break
            for worker in list(active):
                bits = owners.get(worker, 0)
                m = matches[worker]
                if worker not in in_tier_phase and bits & 1:
                    m.device += 1
                    m.exportable += 1
                    continue
                if not bits & _OFFLOAD:
                    del active[worker]
                    continue
                in_tier_phase.add(worker)
                if bits & 2:
                    m.cpu += 1
                    if worker in cpu_run_open:
                        m.exportable += 1
                else:
                    m.disk += 1
                    cpu_run_open.discard(worker)
            if not active:
                break
        for worker in list(matches):
            if matches[worker].total == 0:
                del matches[worker]
        return matches

    def blocks_of(self, worker: str, tier: Tier | None = None) -> set[int]:
        state = self._workers.get(worker)
        if not state:
            return set()
        if tier is None:
            return set(state.blocks)
        bit = _BIT[tier]
        return {h for h, bits in state.blocks.items() if bits & bit}

    @property
    def num_blocks(self) -> int:
        return len(self._owners)
