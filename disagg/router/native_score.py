"""A routing decision's scoring in one C++ call (`disagg_kernels/route_score.cpp`): the prefix index's walk, the
in-flight blocks' count per worker and the kv policy's cost of every decode worker, answered as the cheapest
candidates in (cost, routing order) order.  The policy (router/policy.py, `_scored_pick`) takes the first of them
its eligibility test accepts, with their exact ties, and falls back to its Python pick when the candidates
cannot settle it (every one refused, or ties running past the last one): the decisions are the Python ones,
decision for decision (tests/test_router_scale.py compares them with scoring every worker in Python).

The scorer keeps the per-worker terms the cost reads (load, routing order, tier factors) in arrays the C++ code
reads in place; router/ranking.py's `LoadRanking` reports every change to it as it happens.  It exists only beside
C++ tables that share one worker-id registry (`make_router_tables`); without a compiler the policy scores in
Python.
"""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from disagg.protocol import Tier
from disagg.router.block_table import BlockTable, TierMatch
from disagg.router.in_flight import InFlightBlocks, TableBlocks
from disagg.router.native_table import (
    NativeBlockTable,
    WorkerIds,
    make_block_table,
    make_in_flight,
    packed,
    tier_matches,
)

CANDIDATES = 16  # the cheapest decode workers a call returns: enough for the eligible best and its ties, nearly always


def tier_factor(costs: Mapping[Tier, float], tier: Tier, prior: float) -> float:
    """A tier's cost factor in the kv policy: its measured load/recompute ratio (or `prior`), capped at 1 (a tier
    slower than recomputing is worth nothing)."""
    return min(1.0, costs.get(tier, prior))


class _RouteCall(ctypes.Structure):
    """route_score.cpp's `RouteCall`, field for field."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("index", "in_flight", "order", "active", "queued", "cpu_factor")),
        *((name, ctypes.c_void_p) for name in ("disk_factor", "match_ids", "match_counts", "cand_ids", "cand_costs")),
        *((name, ctypes.c_int32) for name in ("workers", "match_cap", "cand_cap", "session_worker")),
        ("num_blocks", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        *((name, ctypes.c_double) for name in ("overlap_weight", "queue_weight", "bonus")),
        ("kept", ctypes.c_int32),
        ("scored", ctypes.c_int32),
    ]


@dataclass(slots=True)
class Scored:
    """One decision's scoring: the index walk, and the cheapest decode workers (`candidates()`)."""

    matches: dict[str, TierMatch]  # the index walk (PrefixIndex.match's answer)
    names: list[str]  # worker id -> name
    ids: array  # the candidates' worker ids and costs, (cost, routing order) ascending
    costs: array
    complete: bool  # every decode worker is among them
    unrankable: bool  # a cost is NaN: only the full scoring orders them

    def candidates(self) -> Iterator[tuple[str, float]]:
        names = self.names
        return ((names[wid], cost) for wid, cost in zip(self.ids, self.costs, strict=True))


_LOADS = ("order", "active", "queued", "cpu_factor", "disk_factor")
_TYPECODES = ("i", "q", "q", "d", "d")


class NativeScorer:
    """The per-worker cost terms in arrays, and the call that scores a decision over them.  Every method runs under
    the router's lock (RouterCore holds it around routing and every load change): the C++ call reads the arrays
    without the GIL, and `_grow` replaces them."""

    def __init__(
        self, index: NativeBlockTable, in_flight: NativeBlockTable, cpu_prior: float, disk_prior: float
    ) -> None:
        if index.worker_ids is not in_flight.worker_ids:
            raise ValueError("the scorer's tables must share one worker-id registry")
        self._lib, self.ids = index.lib, index.worker_ids
        self._tables = (index, in_flight)  # kept alive while the call holds their handles
        self._priors = (cpu_prior, disk_prior)
        call = self._call = _RouteCall()
        call.index, call.in_flight = index.handle, in_flight.handle
        self._cand_ids, self._cand_costs = array("i", bytes(4 * CANDIDATES)), array("d", bytes(8 * CANDIDATES))
        call.cand_ids, call.cand_costs = self._addresses(self._cand_ids, self._cand_costs)
        call.cand_cap = CANDIDATES
        self._loads: list[array] = [array(code) for code in _TYPECODES]  # per worker id, in _LOADS order
        self._grow(16)
        self._match_buffers(16)

    @staticmethod
    def _addresses(*arrays: array) -> list[int]:
        return [a.buffer_info()[0] for a in arrays]

    def _match_buffers(self, cap: int) -> None:
        self._match_ids, self._match_counts = array("i", bytes(4 * cap)), array("q", bytes(32 * cap))
        call = self._call
        call.match_ids, call.match_counts = self._addresses(self._match_ids, self._match_counts)
        call.match_cap = cap

    def _grow(self, cap: int) -> None:
        """Room for `cap` worker ids, the old values kept (new ids: not decode workers, prior tier factors)."""
        order, active, queued, cpu, disk = self._loads
        more = cap - len(order)
        order.extend([-1] * more)
        active.extend([0] * more)
        queued.extend([0] * more)
        cpu.extend([self._priors[0]] * more)
        disk.extend([self._priors[1]] * more)
        for name, values in zip(_LOADS, self._loads, strict=True):  # (an array that grew may have moved)
            setattr(self._call, name, values.buffer_info()[0])
        self._call.workers = cap

    def _slot(self, name: str) -> int:
        wid = self.ids.id(name)
        if wid >= self._call.workers:
            self._grow(max(2 * self._call.workers, wid + 1))
        return wid

    # ------------------------------------------------------------------ updates (LoadRanking calls them)
    def set_load(self, name: str, active_blocks: int, queued_tokens: int) -> None:
        wid = self._slot(name)
        self._loads[1][wid], self._loads[2][wid] = active_blocks, queued_tokens

    def set_order(self, decode: Iterable[str]) -> None:
        slots = [self._slot(name) for name in decode]
        order = self._loads[0]
        for wid in range(len(order)):
            order[wid] = -1
        for position, wid in enumerate(slots):
            order[wid] = position

    def set_tier_costs(self, name: str, costs: Mapping[Tier, float]) -> None:
        wid = self._slot(name)
        cpu_prior, disk_prior = self._priors
        self._loads[3][wid] = tier_factor(costs, Tier.CPU, cpu_prior)
        self._loads[4][wid] = tier_factor(costs, Tier.DISK, disk_prior)

    # ------------------------------------------------------------------ the decision's scoring
    def score(
        self,
        hashes: Sequence[int],
        num_blocks: int,
        block_size: int,
        weights: tuple[float, float, float],  # overlap weight, queue weight, session bonus
        session_worker: str | None,
    ) -> Scored:
        """Every decode worker's cost for a prompt of these block hashes: the cheapest candidates."""
        buffer, address = packed(hashes)
        call = self._call
        call.session_worker = self.ids.ids.get(session_worker, -1) if session_worker is not None else -1
        call.num_blocks, call.block_size = num_blocks, block_size
        call.overlap_weight, call.queue_weight, call.bonus = weights
        while (found := self._lib.route(ctypes.byref(call), address, len(buffer))) < 0:
            self._match_buffers(max(-found, 2 * call.match_cap))
        names, kept = self.ids.names, call.kept
        return Scored(
            tier_matches(names, self._match_ids, self._match_counts, found),
            names,
            self._cand_ids[: max(0, kept)],
            self._cand_costs[: max(0, kept)],
            complete=call.scored <= CANDIDATES,
            unrankable=kept < 0,
        )


def make_router_tables(
    native: bool, cpu_prior: float, disk_prior: float
) -> tuple[BlockTable, InFlightBlocks, NativeScorer | None]:
    """The router's prefix-index table, its in-flight blocks and, when both are C++ tables, a scorer over them (one
    worker-id registry for the three); Python tables and no scorer where no compiler is found."""
    ids = WorkerIds()
    index, in_flight = make_block_table(native, ids=ids), make_in_flight(native, ids=ids)
    scorer = None
    if isinstance(index, NativeBlockTable) and isinstance(in_flight, TableBlocks):
        table = in_flight.table
        if isinstance(table, NativeBlockTable):
            scorer = NativeScorer(index, table, cpu_prior, disk_prior)
    return index, in_flight, scorer
