"""The decode workers ranked by their load terms, kept current as loads change, so that the kv policy scores only
the workers that can win a decision instead of every worker (routing cost at 256 workers: docs/benchmarks.md).

A worker's cost (router/policy.py) has terms that only some workers have for a given request - a cached prefix in
the index, prompt blocks shared with its in-flight requests, the session's affinity - and load terms every worker
has: its active KV blocks and its queued prefill tokens.  A worker with none of the first kind ("plain" for that
request) costs the same function of its two load terms as any other plain worker, non-decreasing in both (the
queue weight is >= 0).  So the cheapest plain workers come first in load order: `LoadRanking` keeps the workers
grouped by their exact load terms (one group per (active blocks, queued tokens) pair), the groups sorted by
active blocks + queue weight x queued blocks, and which workers' in-flight requests hold each prompt block (for
the shared-blocks term).  WorkerLoad (below, the policy's input) reports every change of its terms to it.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from disagg.protocol import Tier
from disagg.router.in_flight import InFlightBlocks, MaskBlocks
from disagg.router.native_score import NativeScorer
from disagg.router.placement import WorkerTiming

_RANKED_TERMS = frozenset({"active_blocks", "queued_prefill_tokens", "ranking"})


class LoadRanking:
    def __init__(
        self,
        queue_weight: float,
        block_size: int,
        in_flight: InFlightBlocks | None = None,
        scorer: NativeScorer | None = None,  # the same terms in C++ arrays, for a decision in one call
    ) -> None:
        self.queue_weight, self.block_size, self.scorer = queue_weight, block_size, scorer
        # a weight the policy cannot rank by (it then scores every worker): groups kept in terms order instead
        self._weight = queue_weight if math.isfinite(queue_weight) and queue_weight >= 0 else 0.0
        self.order: dict[str, int] = {}  # the decode workers, in routing order (ties are broken in this order)
        self._terms: dict[str, tuple[int, int]] = {}  # worker -> (active blocks, queued prefill tokens)
        self._groups: dict[tuple[int, int], set[str]] = {}  # load terms -> the workers with exactly those
        self._keys: list[tuple[float, int, int]] = []  # (load key, terms) of every group, ascending
        self.in_flight: InFlightBlocks = MaskBlocks() if in_flight is None else in_flight  # the shared-blocks term

    def set_order(self, decode: Iterable[str]) -> None:
        self.order = {name: i for i, name in enumerate(decode)}
        if self.scorer is not None:
            self.scorer.set_order(self.order)

    def key(self, active_blocks: int, queued_tokens: int) -> float:
        return active_blocks + self._weight * (queued_tokens / self.block_size)

    # ------------------------------------------------------------------ updates (WorkerLoad calls them)
    def update(self, name: str, active_blocks: int, queued_tokens: int) -> None:
        terms = (active_blocks, queued_tokens)
        old = self._terms.get(name)
        if old == terms:
            return
        if self.scorer is not None:
            self.scorer.set_load(name, active_blocks, queued_tokens)
        if old is not None:
            left = self._groups[old]
            left.discard(name)
            if not left:
                del self._groups[old]
                del self._keys[bisect.bisect_left(self._keys, (self.key(*old), *old))]
        self._terms[name] = terms
        group = self._groups.get(terms)
        if group is None:
            group = self._groups[terms] = set()
            bisect.insort(self._keys, (self.key(*terms), *terms))
        group.add(name)

    def tier_costs(self, name: str, costs: Mapping[Tier, float]) -> None:
        """`name`'s measured tier costs changed (they price its cached blocks outside device memory)."""
        if self.scorer is not None:
            self.scorer.set_tier_costs(name, costs)

    def hold(self, name: str, hashes: list[int]) -> None:
        """`name`'s in-flight requests now hold these blocks (none of them held before)."""
        self.in_flight.hold(name, hashes)

    def release(self, name: str, hashes: list[int]) -> None:
        """`name`'s in-flight requests hold none of these blocks any more."""
        self.in_flight.release(name, hashes)

    # ------------------------------------------------------------------ queries (under the router's lock)
    def sharing(self, hashes: frozenset[int]) -> dict[str, int]:
        """Workers whose in-flight requests hold any of these blocks -> how many of them (the cost's shared-blocks
        term, `WorkerLoad.shared_blocks`, for every such worker at once)."""
        return self.in_flight.sharing(hashes)

    def groups(self) -> Iterator[tuple[float, set[str]]]:
        """(load key, workers) groups, cheapest first."""
        for key, active, queued in self._keys:
            yield key, self._groups[(active, queued)]


@dataclass
class WorkerLoad:
    """What the router tracks per worker from its own dispatches (exact, no polling), plus measured costs.

    `active_blocks` counts the KV in-flight requests hold with shared prompt blocks counted once (as the worker's
    block pool holds them once): `active_hashes` refcounts the full prompt blocks by hash, `private_blocks`
    counts the rest (partial blocks, output).

    With a `ranking` attached (the router core's), every change of the terms it ranks by is reported to it as it
    happens, direct assignments included."""

    name: str
    active_requests: int = 0
    active_blocks: int = 0
    queued_prefill_tokens: int = 0  # prompt tokens dispatched but not yet past their first token
    tier_cost: Mapping[Tier, float] = field(default_factory=dict)  # measured load/recompute ratio per tier
    timing: WorkerTiming | None = None  # its step-time model and chunk rule, from its heartbeats (placement.py)
    queued_compute_tokens: int = 0  # of the queued prompt tokens, those the router expects computed (uncached)
    decoding: int = 0  # of its active requests, those past their first token
    decode_tokens_left: int = 0  # their output tokens still to come, at most (max_tokens less those generated)
    active_hashes: Counter = field(default_factory=Counter)
    private_blocks: int = 0
    ranking: LoadRanking | None = field(default=None, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "tier_cost":
            value = MappingProxyType(dict(value))  # an edit in place would bypass the ranking's copy
        object.__setattr__(self, name, value)
        ranking = self.__dict__.get("ranking")
        if ranking is None:
            return
        if name == "tier_cost":  # (read-only: replaced whole, so every change reaches the ranking)
            ranking.tier_costs(self.name, value)
        elif name in _RANKED_TERMS:
            self._rank(ranking, attached=name == "ranking")

    def _rank(self, ranking: LoadRanking, attached: bool) -> None:
        ranking.update(self.name, self.active_blocks, self.queued_prefill_tokens)
        if attached:
            ranking.tier_costs(self.name, self.tier_cost)
            ranking.hold(self.name, list(self.active_hashes))

    def add_blocks(self, hashes: list[int], private: int) -> None:
        if self.ranking is not None:
            self.ranking.hold(self.name, [h for h in hashes if h not in self.active_hashes])
        self.active_hashes.update(hashes)
        self.private_blocks += private
        self.active_blocks = len(self.active_hashes) + self.private_blocks

    def remove_blocks(self, hashes: list[int], private: int) -> None:
        counts = self.active_hashes
        gone = []
        for h in hashes:
            left = counts[h] - 1
            if left > 0:
                counts[h] = left
            elif counts.pop(h, None) is not None:
                gone.append(h)
        if self.ranking is not None:
            self.ranking.release(self.name, gone)
        self.private_blocks -= private
        self.active_blocks = len(counts) + self.private_blocks

    def shared_blocks(self, hashes: frozenset[int]) -> int:
        """How many of a request's prompt blocks this worker's in-flight requests already hold."""
        return len(hashes & self.active_hashes.keys()) if self.active_hashes else 0
