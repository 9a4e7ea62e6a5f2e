"""Prefix index: which worker holds which KV block, in which tier, fed by the workers' KV events.

Because block hashes are chained, holding block i's hash implies holding its whole prefix, so a request's match
on a worker is read off the leading run of its block hashes.  A worker serves that run the way its engine
does: first the blocks its device cache holds, then - from the first block missing there - blocks its CPU tier
or disk tier holds; `match` returns that split per worker (`TierMatch`), plus how much of it another worker
could read out of it (device + CPU, the regions registered with NIXL).  Each worker's events carry sequence
numbers; a gap (or a restart, seq_no back to 0) makes `apply` return False and the caller asks that worker for a
snapshot.  Memory is bounded by `max_blocks` entries: past it, the oldest-stored hashes are dropped (the index
may under-report, never over-report a hit).

The router applies a batch in bounded slices (`Ingest`), so a big batch or a snapshot never holds the router's
lock for long; a routing decision between two slices sees a state the worker would have shown had it published
smaller batches.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from disagg.protocol import EventKind, KVEventBatch, Tier

_BIT = {Tier.DEVICE: 1, Tier.CPU: 2, Tier.DISK: 4}
_OFFLOAD = _BIT[Tier.CPU] | _BIT[Tier.DISK]
_ALL = _BIT[Tier.DEVICE] | _OFFLOAD
_UNSLICED = 1 << 62  # `apply`: the whole batch in one step


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
    seen_seq_no: int = -1  # the newest batch delivered, applied or not (a snapshot older than it is stale)
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
        for apply, hashes, bit in self._operations(batch, state):
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

    def _operations(
        self, batch: KVEventBatch, state: IndexedWorker
    ) -> Iterator[tuple[Callable[[str, list[int], int], None], list[int], int]]:
        """The batch as (apply, hashes, tier bits) steps; a snapshot first clears all the worker held."""
        if batch.snapshot:
            yield self._drop_many, list(state.blocks), _ALL
        for event in batch.kv_events():
            bit = _BIT[event.tier]
            if batch.snapshot or event.kind is EventKind.STORED:
                yield self._store, event.block_hashes, bit
            elif event.kind is EventKind.REMOVED:
                yield self._drop_many, event.block_hashes, bit
            elif event.kind is EventKind.CLEARED:
                yield self._drop_many, list(state.blocks), bit  # listed when reached, as the events before it left it

    def _store(self, worker: str, hashes: list[int], bit: int) -> None:
        blocks = self._workers[worker].blocks
        all_owners = self._owners
        for h in hashes:
            owners = all_owners.get(h)
            if owners is None:
                if len(all_owners) >= self.max_blocks:
                    self._evict_oldest()
                owners = all_owners[h] = {}
            blocks[h] = owners[worker] = owners.get(worker, 0) | bit

    def _drop_many(self, worker: str, hashes: list[int], bit: int) -> None:
        """Drop tier `bit` of these blocks from `worker` (a block left in no tier of any worker leaves the index)."""
        all_owners = self._owners
        state = self._workers.get(worker)
        for h in hashes:
            owners = all_owners.get(h)
            if owners is None:
                continue
            held = owners.get(worker)
            if held is None:
                continue
            left = held & ~bit
            if left:
                owners[worker] = left
                if state is not None:
                    state.blocks[h] = left
                continue
            if state is not None:
                state.blocks.pop(h, None)
            del owners[worker]
            if not owners:
                del all_owners[h]

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

    # ------------------------------------------------------------------ queries
    def needs_snapshot(self, worker: str) -> bool:
        state = self._workers.get(worker)
        return state is None or state.needs_snapshot

    def match(self, block_hashes: list[int]) -> dict[str, TierMatch]:
        """Per worker holding the first block, how its engine would serve the leading blocks (see TierMatch)."""
        if not block_hashes:
            return {}
        get = self._owners.get
        first = get(block_hashes[0])
        if not first:
            return {}
        counts = {worker: [0, 0, 0, 0] for worker in first}  # device, cpu, disk, exportable (TierMatch's order)
        walk = _Walk(counts)
        repeats = 0
        for h in block_hashes:
            owners = get(h)
            if not owners:
                break
            # Chains are mostly held by the same workers in the same tiers block after block: a block with the
            # same holders and tier bits as the one before has the same outcome for every worker still matching
            # (no worker leaves the device run, the CPU run or the match on a repeat), so it is only counted.
            if owners == walk.last:
                repeats += 1
                continue
            walk.repeat(repeats)
            repeats = 0
            if not walk.step(owners):
                break
        walk.repeat(repeats)
        return {w: TierMatch(c[0], c[1], c[2], c[3]) for w, c in counts.items() if c[0] + c[1] + c[2]}

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


class _Walk:
    """`PrefixIndex.match`'s walk down a request's blocks: per worker, its device run, then its tier run."""

    def __init__(self, counts: dict[str, list[int]]) -> None:
        self.counts = counts
        self.active = list(counts)
        self.on_device = set(counts)  # still in the device run
        self.cpu_open = set(counts)  # no disk-only block yet: CPU blocks still count as exportable
        self.last: dict[str, int] | None = None  # the holders of the last block stepped
        self.added: list[tuple[list[int], int]] = []  # what that block added: (counts, field)

    def step(self, owners: dict[str, int]) -> bool:
        """Count one block; False when no worker matches any more."""
        added: list[tuple[list[int], int]] = []
        still = []
        for worker in self.active:
            bits = owners.get(worker, 0)
            c = self.counts[worker]
            if bits & 1 and worker in self.on_device:
                added += ((c, 0), (c, 3))
            elif not bits & _OFFLOAD:
                continue  # its run ends here
            else:
                self.on_device.discard(worker)
                if bits & 2:
                    added.append((c, 1))
                    if worker in self.cpu_open:
                        added.append((c, 3))
                else:
                    added.append((c, 2))
                    self.cpu_open.discard(worker)
            still.append(worker)
        for c, i in added:
            c[i] += 1
        self.active, self.last, self.added = still, owners, added
        return bool(still)

    def repeat(self, times: int) -> None:
        """Count `times` more blocks with the same holders and bits as the last one stepped."""
        if times:
            for c, i in self.added:
                c[i] += times


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
