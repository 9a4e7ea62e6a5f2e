"""The prefix index's block table in C++ (`disagg_kernels/prefix_index.cpp`), and the choice between it and the
Python reference (`make_block_table`).

Worker names become small integer ids here (the C++ table knows only ids); hashes cross as one packed uint64
array per call, so a batch of events costs the interpreter a few calls, not a loop over its hashes, and the
table's work runs without the GIL (see block_table.py and the C++ source for why).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from array import array
from collections.abc import Callable, Iterable
from ctypes import Array
from pathlib import Path

from disagg.model_store import cache_root
from disagg.router.block_table import ALL_TIERS, DEFAULT_MAX_BLOCKS, BlockTable, PyBlockTable, TierMatch
from disagg.router.in_flight import InFlightBlocks, MaskBlocks, TableBlocks
from disagg_kernels.prefix_index import IndexLib, load_index_lib

log = logging.getLogger(__name__)
_U64 = 1 << 64
_UNBOUNDED = (1 << 63) - 1  # int64 max: a table that never drops its oldest entries
Buffer = Array | array  # the integers a C++ call wrote: a ctypes array, or an array.array


def packed(hashes: Iterable[int]) -> tuple[array, int]:
    """The hashes as a uint64 array and its address (kept alive by the caller holding the array).  A value outside
    uint64 (a faulty worker's: block hashes are 8-byte digests) is left out: no request's hash can equal it."""
    try:
        out = array("Q", hashes)
    except OverflowError:
        out = array("Q", (h for h in hashes if 0 <= h < _U64))  # (a list or set: read twice)
    return out, out.buffer_info()[0]


def tier_matches(names: list[str], ids: Buffer, counts: Buffer, found: int) -> dict[str, TierMatch]:
    """`pi_match`'s answer (`found` worker ids, and 4 counts each: device, CPU, disk, exportable) as the index's
    match: the workers that would serve any of the leading blocks, by name."""
    out = {}
    for j in range(found):
        device, cpu, disk, exportable = counts[4 * j : 4 * j + 4]
        if device + cpu + disk:
            out[names[ids[j]]] = TierMatch(device, cpu, disk, exportable)
    return out


class WorkerIds:
    """Worker name -> small integer id, the only worker names the C++ code knows.  One registry may serve several
    tables (and router/native_score.py's scorer): their ids then agree, and one C++ call can combine them."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []

    def id(self, worker: str) -> int:
        wid = self.ids.get(worker)
        if wid is None:
            wid = self.ids[worker] = len(self.names)
            self.names.append(worker)
        return wid


class NativeBlockTable:
    """A `BlockTable` over the compiled C++ table (see the module docstring)."""

    def __init__(self, lib: IndexLib, max_blocks: int = DEFAULT_MAX_BLOCKS, ids: WorkerIds | None = None) -> None:
        self.max_blocks, self._lib = max_blocks, lib
        self._table = lib.new(max_blocks)
        self.worker_ids = WorkerIds() if ids is None else ids
        self._ids, self._names = self.worker_ids.ids, self.worker_ids.names  # (shared with the registry)
        self._grow(16)

    @property
    def lib(self) -> IndexLib:
        return self._lib

    @property
    def handle(self) -> int:
        """The C++ table, for a call that reads several tables at once (route_score.cpp)."""
        return self._table

    def __del__(self) -> None:
        table, self._table = getattr(self, "_table", None), None
        if table:
            self._lib.free(table)

    def _grow(self, workers: int) -> None:
        # one tuple, replaced whole: a call reads its buffers and their size together
        self._buffers = ((ctypes.c_int32 * workers)(), (ctypes.c_int64 * (4 * workers))(), workers)

    def _per_worker(self, call: Callable[..., int], block_hashes: Iterable[int]) -> tuple[int, Array, Array]:
        """A per-worker query of the C++ table (`match`, `shared`): (workers written, their ids, their counts).  The
        call answers -(workers needed) when the buffers are too small: they grow and it runs again."""
        buffer, address = packed(block_hashes)
        while True:
            ids, counts, cap = self._buffers
            found = call(self._table, address, len(buffer), ids, counts, cap)
            if found >= 0:
                return found, ids, counts
            self._grow(max(-found, 2 * cap))

    def __len__(self) -> int:
        return int(self._lib.size(self._table))

    def store(self, worker: str, hashes: list[int], bit: int) -> None:
        if hashes:
            buffer, address = packed(hashes)
            self._lib.store(self._table, self.worker_ids.id(worker), address, len(buffer), bit)

    def drop(self, worker: str, hashes: list[int], bit: int) -> None:
        if hashes and worker in self._ids:
            buffer, address = packed(hashes)
            self._lib.drop(self._table, self._ids[worker], address, len(buffer), bit)

    def drop_all(self, worker: str, bit: int = ALL_TIERS) -> None:
        if worker in self._ids:
            self._lib.drop_all(self._table, self._ids[worker], bit)

    def worker_blocks(self, worker: str, mask: int = ALL_TIERS) -> list[int]:
        wid = self._ids.get(worker)
        if wid is None:
            return []
        size = 1024
        while True:
            out = (ctypes.c_uint64 * size)()
            count = self._lib.worker_blocks(self._table, wid, mask, out, size)
            if count <= size:
                return list(out[:count])
            size = int(count)  # it grew between the calls at most by what the other thread stored: try again

    def block_counts(self) -> dict[str, int]:
        names = list(self._names)  # one length for the buffer and the call: a worker may be added meanwhile
        counts = (ctypes.c_int64 * max(1, len(names)))()
        self._lib.worker_counts(self._table, counts, len(names))
        return {name: counts[i] for i, name in enumerate(names) if counts[i]}

    def match(self, block_hashes: list[int]) -> dict[str, TierMatch]:
        if not block_hashes:
            return {}
        found, ids, counts = self._per_worker(self._lib.match, block_hashes)
        return tier_matches(self._names, ids, counts, found)

    def shared(self, block_hashes: frozenset[int]) -> dict[str, int]:
        if not block_hashes:
            return {}
        found, ids, counts = self._per_worker(self._lib.shared, block_hashes)
        names = self._names
        return {names[ids[j]]: counts[j] for j in range(found)}

    def owners(self, block_hash: int) -> dict[str, int]:
        cap = self._buffers[2]
        ids, bits = (ctypes.c_int32 * cap)(), (ctypes.c_uint8 * cap)()
        found = self._lib.owners(self._table, block_hash, ids, bits, cap)
        if found > cap:
            self._grow(found)
            return self.owners(block_hash)
        return {self._names[ids[j]]: bits[j] for j in range(found)}

    def holders(self) -> dict[int, dict[str, int]]:
        held = {h for name in self._names for h in self.worker_blocks(name)}
        return {h: self.owners(h) for h in held}


@functools.cache
def _library(cache_dir: Path) -> tuple[IndexLib | None, str]:
    """Built (or found in the cache) once per process: a router core is made per test and per simulation."""
    return load_index_lib(cache_dir)


def library() -> IndexLib | None:
    """The router's C++ library, or None where it does not build here (make_block_table logs why)."""
    return _library(cache_root() / "kernels")[0]


def make_in_flight(native: bool, ids: WorkerIds | None = None) -> InFlightBlocks:
    """The router's in-flight blocks (router/in_flight.py): in a C++ table when asked for and it builds here (with
    no bound: what is in flight is bounded by the workers' KV), else as bit masks in Python."""
    if native:
        lib, _ = _library(cache_root() / "kernels")  # make_block_table logs why not, once per router
        if lib is not None:
            return TableBlocks(NativeBlockTable(lib, max_blocks=_UNBOUNDED, ids=ids))
    return MaskBlocks()


def make_block_table(native: bool, max_blocks: int = DEFAULT_MAX_BLOCKS, ids: WorkerIds | None = None) -> BlockTable:
    """The C++ table when asked for and it builds here, else the Python one (and the log says why)."""
    if native:
        lib, why = _library(cache_root() / "kernels")
        if lib is not None:
            return NativeBlockTable(lib, max_blocks, ids)
        log.warning("prefix index kept in Python (slower under heavy KV-event ingest): %s", why)
    return PyBlockTable(max_blocks)
