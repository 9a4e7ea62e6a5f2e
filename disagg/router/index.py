"""Prefix index: which worker holds which KV block, in which tier, fed by the workers' KV events.

Because block hashes are chained, holding block i's hash implies holding its whole prefix, so a request's match
on a worker is read off the leading run of its block hashes.  A worker serves that run the way its engine
does: first the blocks its device cache holds, then - from the first block missing there - blocks its CPU tier
or disk tier holds; `match` returns that split per worker (`TierMatch`), plus how much of it another worker
could read out of it (device + CPU, the regions registered with NIXL).  Each worker's events carry sequence
numbers; a gap (or a restart, seq_no back to 0) makes `apply` return False and the caller asks that worker for a
snapshot.  The blocks themselves live in a `BlockTable` (block_table.py: in C++ by default, or in Python),
bounded by `max_blocks` entries.

The router applies a batch in bounded slices (`Ingest`), so a big batch or a snapshot never holds the router's
lock for long; a routing decision between two slices sees a state the worker would have shown had it published
smaller batches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from disagg.protocol import EventKind, KVEventBatch, Tier
from disagg.router.block_table import ALL_TIERS, BIT, DEFAULT_MAX_BLOCKS, BlockTable, PyBlockTable, TierMatch
from disagg.router.native_table import make_block_table, make_in_flight

__all__ = ["Ingest", "PrefixIndex", "TierMatch", "make_block_table", "make_in_flight"]
_UNSLICED = 1 << 62  # `apply`: the whole batch in one step
_Apply = Callable[[str, list[int], int], None]  # a table's store or drop, or PrefixIndex._clear
# a whole tier of a worker's blocks dropped in one table call (a snapshot's clear, CLEARED): one step of a slice
# (one scan of the table, under the router's lock: these events are rare)
_ONE_STEP = [0]


@dataclass
class IndexedWorker:
    last_seq_no: int = -1
    seen_seq_no: int = -1  # the newest batch delivered, applied or not (a snapshot older than it is stale)
    needs_snapshot: bool = False


class PrefixIndex:
    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS, table: BlockTable | None = None) -> None:
        self.table = table if table is not None else PyBlockTable(max_blocks)
        self.max_blocks = self.table.max_blocks
        self._workers: dict[str, IndexedWorker] = {}

    # ------------------------------------------------------------------ updates
    def add_worker(self, worker: str) -> None:
        self._workers.setdefault(worker, IndexedWorker())

    def remove_worker(self, worker: str) -> None:
        if self._workers.pop(worker, None) is not None:
            self.table.drop_all(worker)

    def has_worker(self, worker: str) -> bool:
        return worker in self._workers

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply a batch; False (and nothing applied) if a gap means the caller must fetch a snapshot."""
        steps = self.begin(batch, _UNSLICED)
        if steps is None:
            return False
        for _ in steps:
            pass
        return True

    def begin(self, batch: KVEventBatch, slice_blocks: int) -> Iterator[None] | None:
        """Start applying a batch: None (and nothing applied) if a gap means the caller must fetch a snapshot, else
        the work as an iterator whose every step applies at most `slice_blocks` block hashes, in event order (the
        router holds its lock per step, not per batch: see `Ingest`)."""
        state = self._workers.setdefault(batch.worker, IndexedWorker())
        if not batch.snapshot:
            state.seen_seq_no = max(state.seen_seq_no, batch.seq_no)
            if state.needs_snapshot or batch.seq_no != state.last_seq_no + 1:
                state.needs_snapshot = True
                return None
        state.last_seq_no = batch.seq_no
        # a snapshot taken before batches already delivered (its fetch raced the event feed) is applied, but another
        # is asked for: the batches it misses were refused or came before it, and the worker may send no more
        state.needs_snapshot = batch.snapshot and batch.seq_no < state.seen_seq_no
        return self._steps(batch, state, slice_blocks)

    def _steps(self, batch: KVEventBatch, state: IndexedWorker, slice_blocks: int) -> Iterator[None]:
        worker, done = batch.worker, 0
        for apply, hashes, bit in self._operations(batch):
            start = 0
            while start < len(hashes):
                end = start + slice_blocks - done
                apply(worker, hashes if start == 0 and end >= len(hashes) else hashes[start:end], bit)
                done += min(end, len(hashes)) - start
                start = end
                if done >= slice_blocks:
                    done = 0
                    yield
                    if self._workers.get(worker) is not state:  # removed meanwhile (out of routing): stop
                        return

    def _operations(self, batch: KVEventBatch) -> Iterator[tuple[_Apply, list[int], int]]:
        """The batch as (apply, hashes, tier bits) steps; a snapshot first clears all the worker held."""
        table = self.table
        if batch.snapshot:
            yield self._clear, _ONE_STEP, ALL_TIERS
        for event in batch.kv_events():
            bit = BIT[event.tier]
            if batch.snapshot or event.kind is EventKind.STORED:
                yield table.store, event.block_hashes, bit
            elif event.kind is EventKind.REMOVED:
                yield table.drop, event.block_hashes, bit
            elif event.kind is EventKind.CLEARED:
                yield self._clear, _ONE_STEP, bit  # what the events before it left, when it is reached

    def _clear(self, worker: str, _: list[int], bit: int) -> None:
        self.table.drop_all(worker, bit)

    # ------------------------------------------------------------------ queries
    def needs_snapshot(self, worker: str) -> bool:
        state = self._workers.get(worker)
        return state is None or state.needs_snapshot

    def match(self, block_hashes: list[int]) -> dict[str, TierMatch]:
        """Per worker holding the first block, how its engine would serve the leading blocks (see TierMatch)."""
        return self.table.match(block_hashes)

    def blocks_of(self, worker: str, tier: Tier | None = None) -> set[int]:
        if worker not in self._workers:
            return set()
        return set(self.table.worker_blocks(worker, ALL_TIERS if tier is None else BIT[tier]))

    def block_counts(self) -> dict[str, int]:
        """Blocks held per worker in routing (any tier)."""
        counts = self.table.block_counts()  # safe beside ingest on another thread (each table's own copy)
        return {worker: counts.get(worker, 0) for worker in list(self._workers)}

    @property
    def num_blocks(self) -> int:
        return len(self.table)


class Ingest:
    """Applies workers' KV event batches to the router's index under the router's lock, at most `slice_blocks`
    block hashes per hold: a routing decision waits for one slice, not for a whole batch or snapshot.  A worker's
    batches still apply one after another, in order (a lock per worker, taken before the router's)."""

    def __init__(self, index: PrefixIndex, lock: threading.Lock, slice_blocks: int) -> None:
        self.index, self.lock, self.slice_blocks = index, lock, slice_blocks
        self._order: dict[str, threading.Lock] = {}

    def apply(self, batch: KVEventBatch) -> bool:
        """As `PrefixIndex.apply` (False: a gap, nothing applied)."""
        order = self._order.get(batch.worker) or self._order.setdefault(batch.worker, threading.Lock())
        with order:
            with self.lock:
                steps = self.index.begin(batch, self.slice_blocks)
                if steps is None:
                    return False
                more = next(steps, _DONE) is not _DONE
            while more:
                time.sleep(0)  # offer the GIL: a routing thread waiting on it gets in between two slices
                with self.lock:
                    more = next(steps, _DONE) is not _DONE
        return True


_DONE = object()
