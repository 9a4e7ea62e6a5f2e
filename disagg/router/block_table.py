"""Where the prefix index keeps its blocks: block hash -> the workers holding it and in which tiers, per worker
the hashes it holds, and the walk down a request's blocks (`match`).  `PrefixIndex` (index.py) owns the event
stream's bookkeeping (sequence numbers, gaps, snapshots, slices) and applies each event through a `BlockTable`.

Two tables, chosen at construction (`make_block_table`), with the same results operation for operation
(tests/test_block_table.py drives both with random operations and compares every state and match):
- `NativeBlockTable` (native_table.py): the table in C++ (`disagg_kernels/prefix_index.cpp`), called without the
  GIL, so event ingest does not stall routing decisions on another thread; the default where a compiler is found;
- `PyBlockTable` (here): the reference, in Python, for machines without one.

Memory is bounded by `max_blocks` entries: past it, the oldest-stored hashes are dropped (the index may
under-report, never over-report a hit).  Tier bits: 1 device, 2 CPU, 4 disk.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from disagg.protocol import Tier

BIT = {Tier.DEVICE: 1, Tier.CPU: 2, Tier.DISK: 4}
OFFLOAD = BIT[Tier.CPU] | BIT[Tier.DISK]
ALL_TIERS = BIT[Tier.DEVICE] | OFFLOAD
DEFAULT_MAX_BLOCKS = 2_000_000


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


class BlockTable(Protocol):
    max_blocks: int

    def store(self, worker: str, hashes: list[int], bit: int) -> None:
        """`worker` holds these blocks in tier `bit` (the bits of other tiers it holds them in stay)."""

    def drop(self, worker: str, hashes: list[int], bit: int) -> None:
        """`worker` no longer holds these in tier `bit` (a block left in no tier of any worker leaves the table)."""

    def drop_all(self, worker: str, bit: int = ALL_TIERS) -> None:
        """Tier `bit` of everything `worker` holds (every tier: the worker's removal)."""

    def worker_blocks(self, worker: str, mask: int = ALL_TIERS) -> list[int]:
        """The hashes `worker` holds in any tier of `mask`."""

    def block_counts(self) -> dict[str, int]:
        """How many blocks each worker holds (in any tier; workers holding none are left out)."""

    def match(self, block_hashes: list[int]) -> dict[str, TierMatch]:
        """Per worker holding the first block, how its engine would serve the leading blocks: its device run
        first, then from the first block missing on device its CPU / disk blocks (see TierMatch)."""

    def shared(self, block_hashes: frozenset[int]) -> dict[str, int]:
        """Per worker holding any of these (distinct) blocks in any tier, how many it holds."""

    def owners(self, block_hash: int) -> dict[str, int]:
        """The workers holding a block, with their tier bits, in the order they came."""

    def holders(self) -> dict[int, dict[str, int]]:
        """Every block's holders and their tier bits (tests compare tables with it)."""

    def __len__(self) -> int: ...


class PyBlockTable:
    """The table in Python dicts (the reference; see the module docstring)."""

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self._owners: OrderedDict[int, dict[str, int]] = OrderedDict()  # hash -> {worker: tier bits}, by first store
        self._held: dict[str, dict[int, int]] = {}  # worker -> {hash: tier bits}

    def __len__(self) -> int:
        return len(self._owners)

    def store(self, worker: str, hashes: list[int], bit: int) -> None:
        blocks = self._held.setdefault(worker, {})
        all_owners = self._owners
        for h in hashes:
            owners = all_owners.get(h)
            if owners is None:
                if len(all_owners) >= self.max_blocks:
                    self._evict_oldest()
                owners = all_owners[h] = {}
            blocks[h] = owners[worker] = owners.get(worker, 0) | bit

    def drop(self, worker: str, hashes: list[int], bit: int) -> None:
        all_owners = self._owners
        blocks = self._held.setdefault(worker, {})
        for h in hashes:
            owners = all_owners.get(h)
            if owners is None:
                continue
            held = owners.get(worker)
            if held is None:
                continue
            left = held & ~bit
            if left:
                owners[worker] = blocks[h] = left
                continue
            blocks.pop(h, None)
            del owners[worker]
            if not owners:
                del all_owners[h]

    def drop_all(self, worker: str, bit: int = ALL_TIERS) -> None:
        self.drop(worker, self.worker_blocks(worker, bit), bit)
        if bit == ALL_TIERS:
            self._held.pop(worker, None)

    def worker_blocks(self, worker: str, mask: int = ALL_TIERS) -> list[int]:
        return [h for h, bits in self._held.get(worker, {}).items() if bits & mask]

    def shared(self, block_hashes: frozenset[int]) -> dict[str, int]:
        found: dict[str, int] = {}
        get = self._owners.get
        for h in block_hashes:
            for worker in get(h, ()):
                found[worker] = found.get(worker, 0) + 1
        return found

    def owners(self, block_hash: int) -> dict[str, int]:
        return dict(self._owners.get(block_hash, {}))

    def holders(self) -> dict[int, dict[str, int]]:
        return {h: dict(owners) for h, owners in self._owners.items()}

    def block_counts(self) -> dict[str, int]:
        # a copy first (one step under the GIL): another thread may add a worker meanwhile
        return {worker: len(held) for worker, held in list(self._held.items()) if held}

    def _evict_oldest(self) -> None:
        h, owners = self._owners.popitem(last=False)
        for worker in owners:
            self._held[worker].pop(h, None)

    def match(self, block_hashes: list[int]) -> dict[str, TierMatch]:
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


class _Walk:
    """`PyBlockTable.match`'s walk down a request's blocks: per worker, its device run, then its tier run."""

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
            elif not bits & OFFLOAD:
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
