"""Prefix index: which worker holds which KV block (by chained block hash), fed by the workers' KV events.

Because block hashes are chained, holding block i's hash implies holding its whole prefix, so a request's match
on a worker is the length of the leading run of its block hashes that the worker holds: O(prefix length) per
lookup.  Each worker's events carry sequence numbers; a gap (or a restart, seq_no back to 0) makes `apply`
return False and the caller asks that worker for a snapshot.  Memory is bounded by `max_blocks` entries: past
it, the oldest-stored hashes are dropped (the index may under-report, never over-report a hit).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from disagg.protocol import KVEventBatch


@dataclass
class WorkerState:
    last_seq_no: int = -1
    needs_snapshot: bool = False
    blocks: set[int] = field(default_factory=set)


class PrefixIndex:
    def __init__(self, max_blocks: int = 2_000_000) -> None:
        self.max_blocks = max_blocks
        self._owners: OrderedDict[int, set[str]] = OrderedDict()  # hash -> workers holding it (insertion order)
        self._workers: dict[str, WorkerState] = {}

    # ------------------------------------------------------------------ updates
    def add_worker(self, worker: str) -> None:
        self._workers.setdefault(worker, WorkerState())

    def remove_worker(self, worker: str) -> None:
        state = self._workers.pop(worker, None)
        if state:
            for h in state.blocks:
                self._drop(h, worker)

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply a batch; False (and nothing applied) if a gap means the caller must fetch a snapshot."""
        state = self._workers.setdefault(batch.worker, WorkerState())
        if batch.snapshot:
            self._clear_worker(batch.worker)
            for event in batch.kv_events():
                self._store(batch.worker, event.block_hashes)
            state.last_seq_no = batch.seq_no
            state.needs_snapshot = False
            return True
        if state.needs_snapshot or batch.seq_no != state.last_seq_no + 1:
            state.needs_snapshot = True
            return False
        state.last_seq_no = batch.seq_no
        for event in batch.kv_events():
            if event.kind == "stored":
                self._store(batch.worker, event.block_hashes)
            elif event.kind == "removed":
                for h in event.block_hashes:
                    self._drop(h, batch.worker)
            elif event.kind == "cleared":
                self._clear_worker(batch.worker)
        return True

    def _store(self, worker: str, hashes: list[int]) -> None:
        blocks = self._workers[worker].blocks
        for h in hashes:
            owners = self._owners.get(h)
            if owners is None:
                if len(self._owners) >= self.max_blocks:
                    self._evict_oldest()
                owners = self._owners[h] = set()
            owners.add(worker)
            blocks.add(h)

    def _drop(self, h: int, worker: str) -> None:
        state = self._workers.get(worker)
        if state is not None:
            state.blocks.discard(h)
        owners = self._owners.get(h)
        if owners is not None:
            owners.discard(worker)
            if not owners:
                del self._owners[h]

    def _evict_oldest(self) -> None:
        h, owners = self._owners.popitem(last=False)
        for worker in owners:
            self._workers[worker].blocks.discard(h)

    def _clear_worker(self, worker: str) -> None:
        for h in list(self._workers[worker].blocks):
            self._drop(h, worker)

    # ------------------------------------------------------------------ queries
    def needs_snapshot(self, worker: str) -> bool:
        state = self._workers.get(worker)
        return state is None or state.needs_snapshot

    def match(self, block_hashes: list[int]) -> dict[str, int]:
        """Per worker, how many leading blocks of `block_hashes` it holds (workers with 0 are omitted)."""
        matches: dict[str, int] = {}
        active: set[str] | None = None
        for i, h in enumerate(block_hashes):
            owners = self._owners.get(h)
            if not owners:
                break
            active = set(owners) if active is None else active & owners
            if not active:
                break
            for worker in active:
                matches[worker] = i + 1
        return matches

    def blocks_of(self, worker: str) -> set[int]:
        state = self._workers.get(worker)
        return set(state.blocks) if state else set()

    @property
    def num_blocks(self) -> int:
        return len(self._owners)
