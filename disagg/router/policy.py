"""Routing policy: which decode worker serves a request, and whether its prefill runs remotely.

Cost of worker w (lower is better), in block units so the terms are comparable:

    cost(w) = overlap_weight * uncached_prefill_blocks(w)     prefill work left after w's cached prefix
            + active_blocks(w)                                KV the worker's in-flight requests hold
            + queue_weight * queued_prefill_blocks(w)         prefill work already waiting on w
            - affinity_bonus   if the request's session last went to w

Dynamo's KV router uses the first two terms; the queue term keeps a worker with a hot prefix from being buried
under a burst, and the session term keeps multi-turn conversations together even before their blocks are
indexed.  Ties (or near-ties, with temperature > 0) are broken by a softmax over -cost / temperature.

Conditional disaggregation: prefill runs on a prefill worker only when the uncached part is long enough to be
worth a transfer (>= min_remote_prefill_tokens) and some prefill worker is below its queue limit.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field


@dataclass
class PolicyConfig:
    kind: str = "kv"  # "kv" | "round_robin" | "least_loaded"
    overlap_weight: float = 1.0
    queue_weight: float = 1.0
    affinity_bonus: float = 4.0  # blocks
    temperature: float = 0.0  # 0: argmin, random among exact ties
    min_remote_prefill_tokens: int = 64
    max_prefill_queue_tokens: int = 8192  # a prefill worker with more queued prompt tokens counts as saturated
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("kv", "round_robin", "least_loaded"):
            raise ValueError(f"unknown policy {self.kind!r}: kv, round_robin or least_loaded")


@dataclass
class WorkerLoad:
    """What the router tracks per worker from its own dispatches (exact, no polling)."""

    name: str
    active_requests: int = 0
    active_blocks: int = 0  # blocks held by in-flight requests (prompt + output so far, estimated)
    queued_prefill_tokens: int = 0  # prompt tokens dispatched but not yet past their first token


@dataclass
class Decision:
    decode_worker: str
    prefill_worker: str | None  # None: prefill on the decode worker
    overlap_blocks: int  # cached prefix blocks on the chosen decode worker
    costs: dict[str, float] = field(default_factory=dict)
    reason: str = ""


class RoutingPolicy:
    def __init__(self, config: PolicyConfig | None = None, block_size: int = 16) -> None:
        self.config = config or PolicyConfig()
        self.block_size = block_size
        self._rng = random.Random(self.config.seed)
        self._rr_decode = itertools.count()
        self._rr_prefill = itertools.count()
        self._sessions: dict[str, str] = {}

    def choose(self, num_tokens: int, matches: dict[str, int], decode: list[WorkerLoad],
               prefill: list[WorkerLoad], session: str | None = None) -> Decision:
        if not decode:
            raise ValueError("no decode workers")
        num_blocks = -(-num_tokens // self.block_size)
        kind = self.config.kind
        if kind == "round_robin":
            chosen = decode[next(self._rr_decode) % len(decode)]
            costs = {}
        elif kind == "least_loaded":
            costs = {w.name: float(w.active_requests) for w in decode}
            chosen = self._pick(decode, costs)
        else:
            costs = {w.name: self._cost(w, num_blocks, matches.get(w.name, 0), session) for w in decode}
            chosen = self._pick(decode, costs)
        overlap = matches.get(chosen.name, 0)
        if session:
            self._sessions[session] = chosen.name
        prefill_worker, reason = self._choose_prefill(num_tokens - overlap * self.block_size, num_blocks,
                                                      matches, prefill)
        return Decision(chosen.name, prefill_worker, overlap, costs, reason)

    def _cost(self, w: WorkerLoad, num_blocks: int, overlap: int, session: str | None) -> float:
        c = self.config
        queued = w.queued_prefill_tokens / self.block_size
        cost = c.overlap_weight * (num_blocks - overlap) + w.active_blocks + c.queue_weight * queued
        if session is not None and self._sessions.get(session) == w.name:
            cost -= c.affinity_bonus
        return cost

    def _pick(self, workers: list[WorkerLoad], costs: dict[str, float]) -> WorkerLoad:
        temperature = self.config.temperature
        if temperature > 0:
            best = min(costs.values())
            weights = [math.exp(-(costs[w.name] - best) / temperature) for w in workers]
            return self._rng.choices(workers, weights=weights)[0]
        best = min(costs[w.name] for w in workers)
        return self._rng.choice([w for w in workers if costs[w.name] == best])

    def _choose_prefill(self, uncached_tokens: int, num_blocks: int, matches: dict[str, int],
                        prefill: list[WorkerLoad]) -> tuple[str | None, str]:
        if not prefill:
            return None, "aggregated"
        if uncached_tokens < self.config.min_remote_prefill_tokens:
            return None, f"local prefill: {uncached_tokens} uncached tokens"
        available = [w for w in prefill if w.queued_prefill_tokens < self.config.max_prefill_queue_tokens]
        if not available:
            return None, "local prefill: prefill workers saturated"
        if self.config.kind == "round_robin":
            return available[next(self._rr_prefill) % len(available)].name, "remote prefill"
        costs = {w.name: (num_blocks - matches.get(w.name, 0)) + w.queued_prefill_tokens / self.block_size
                 for w in available}
        return self._pick(available, costs).name, "remote prefill"
