"""Which decode workers' in-flight requests hold which prompt blocks: the kv policy's shared-blocks term (a
request's blocks already held on a worker add no KV there), asked once per routing decision for every worker at
once (`sharing`), kept current as requests begin and end (`hold`, `release`; router/ranking.py's WorkerLoad).

Two implementations, the same answers (tests/test_block_table.py drives both with random operations):
- `TableBlocks`: the blocks in a `BlockTable`, the C++ one where it builds (router/native_table.py's
  `make_in_flight`).  A decision's lookup is one call: at 256 workers the router holds tens of thousands of
  in-flight blocks, and probing a prompt's 20-130 hashes in a Python dict that size missed the cache on nearly
  every probe once KV-event ingest ran between decisions (docs/benchmarks.md, "Decision latency at scale").
- `MaskBlocks`: Python, block hash -> a bit mask over the workers (ints, not sets: the collector does not walk
  them), for machines without a compiler.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from disagg.router.block_table import BlockTable

_HELD = 1  # the tier bit the table keeps them under (in-flight blocks have no tier)


class InFlightBlocks(Protocol):
    def hold(self, name: str, hashes: list[int]) -> None:
        """`name`'s in-flight requests now hold these blocks (none of them held before)."""

    def release(self, name: str, hashes: list[int]) -> None:
        """`name`'s in-flight requests hold none of these blocks any more."""

    def sharing(self, hashes: frozenset[int]) -> dict[str, int]:
        """Workers whose in-flight requests hold any of these blocks -> how many of them."""


class TableBlocks:
    """In-flight blocks in a block table (see the module docstring); its bound must exceed what can be in flight."""

    def __init__(self, table: BlockTable) -> None:
        self.table = table

    def hold(self, name: str, hashes: list[int]) -> None:
        self.table.store(name, hashes, _HELD)

    def release(self, name: str, hashes: list[int]) -> None:
        self.table.drop(name, hashes, _HELD)

    def sharing(self, hashes: frozenset[int]) -> dict[str, int]:
        return self.table.shared(hashes)


class MaskBlocks:
    """In-flight blocks as bit masks over the workers (see the module docstring)."""

    def __init__(self) -> None:
        self._holders: dict[int, int] = {}  # block hash -> its holders' bits
        self._bits: dict[str, int] = {}
        self._names: list[str] = []

    def _bit(self, name: str) -> int:
        bit = self._bits.get(name)
        if bit is None:
            bit = self._bits[name] = 1 << len(self._names)
            self._names.append(name)
        return bit

    def hold(self, name: str, hashes: Iterable[int]) -> None:
        holders, bit = self._holders, self._bit(name)
        for h in hashes:
            holders[h] = holders.get(h, 0) | bit

    def release(self, name: str, hashes: Iterable[int]) -> None:
        holders, keep = self._holders, ~self._bit(name)
        for h in hashes:
            held = holders.get(h)
            if held is not None:
                if held & keep:
                    holders[h] = held & keep
                else:
                    del holders[h]

    def sharing(self, hashes: frozenset[int]) -> dict[str, int]:
        by_mask: dict[int, int] = {}  # holder mask -> blocks held by exactly those workers (few masks a prompt)
        holders = self._holders
        for h in holders.keys() & hashes:  # in C
            mask = holders[h]
            by_mask[mask] = by_mask.get(mask, 0) + 1
        found: dict[str, int] = {}
        names = self._names
        for mask, count in by_mask.items():
            while mask:
                low = mask & -mask
                name = names[low.bit_length() - 1]
                found[name] = found.get(name, 0) + count
                mask ^= low
        return found
