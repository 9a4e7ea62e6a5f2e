"""Routing policy: which decode worker serves a request, where its prefill runs, and whether a prefix is pulled
from a peer.

Cost of worker w (lower is better), in block units so the terms are comparable:

    cost(w) = overlap_weight * (uncached_blocks(w)                prefill work left after w's cached prefix
                                + sum_tier tier_blocks(w) * c_tier(w))   loading from CPU / disk, priced as a
                                                                  fraction of recomputing (capped at 1: a tier
                                                                  slower than prefill is worth nothing)
            + active_blocks(w) + new_blocks(w)                    KV the worker's in-flight requests hold (shared
                                                                  prompt blocks once) plus the request's blocks
                                                                  not already among them
            + queue_weight * queued_prefill_blocks(w)             prefill work already waiting on w
            - affinity_bonus   if the request's session last went to w

c_tier(w) is the worker's measured load time per block over its measured prefill time per block (from its
heartbeats), or the configured prior until measured.  Dynamo's KV router uses the first and third terms; the
queue term keeps a worker with a hot prefix from being buried under a burst, the session term keeps multi-turn
conversations together before their blocks are indexed.  Ties (or near-ties, with temperature > 0) are broken
by a softmax over -cost / temperature.

With many workers, `choose_ranked` makes the same decision faster: where the router's C++ library builds, every
decode worker is scored in one native call (`score`, router/native_score.py) and the eligible cheapest taken from
its candidates; otherwise (or when those cannot settle it) only the workers that can win are scored (the ones
with a cached prefix, shared in-flight blocks or the session, plus the least loaded others: router/ranking.py).

Conditional disaggregation (`placement`): with `threshold`, prefill runs on a prefill worker when the uncached
part is long enough to be worth a transfer (>= min_remote_prefill_tokens) and some prefill worker is below its
queue limit; with `cost`, on whichever of the decode worker and the prefill workers gives the lowest predicted
time to first token, from the workers' measured step times (router/placement.py).  Otherwise
the decode worker prefills locally, and if another worker holds a longer prefix in device memory or its CPU tier
(at least min_peer_pull_blocks more), the decode worker reads that prefix from it instead of recomputing it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from disagg.isolation import AdapterKey, Affinity
from disagg.protocol import Tier
from disagg.router.correction import CorrectionConfig, TtftCorrection
from disagg.router.decision import Decision, as_match
from disagg.router.index import TierMatch
from disagg.router.native_score import Scored, tier_factor
from disagg.router.placement import Placement, PlacementModel, cheapest, fastest_idle, idle_taker, whole_decision
from disagg.router.policy_config import PolicyConfig as PolicyConfig  # re-exported: the policy's settings
from disagg.router.policy_config import PolicyKind as PolicyKind
from disagg.router.ranking import LoadRanking
from disagg.router.ranking import WorkerLoad as WorkerLoad  # re-exported: the policy's input
from disagg.utils import cdiv

_NO_MATCH = TierMatch()
_UNRANKABLE = "unrankable"  # choose_ranked: a cost is NaN, whose order only the full scoring reproduces
_UNSETTLED = "unsettled"  # the native candidates cannot settle it (all refused, or ties past the last one)
_Picked = tuple[str, dict[str, float]] | str | None  # (chosen, costs scored), _UNRANKABLE / _UNSETTLED, or none


class RoutingPolicy:
    def __init__(self, config: PolicyConfig | None = None, block_size: int = 16) -> None:
        self.config = config or PolicyConfig()
        self.block_size = block_size
        self._rng = random.Random(self.config.seed)
        self._rr_decode = itertools.count()
        self._rr_prefill = itertools.count()
        self._sessions: OrderedDict[Affinity, str] = OrderedDict()  # session -> its last worker
        c = self.config
        # each worker's correction, learned from outcomes (the core's LatencyWindow records them)
        self.correction = TtftCorrection(CorrectionConfig(window=c.ttft_correction_window))
        self.placement = PlacementModel(c.prior(), c.prior_transfer_s_per_block, block_size, self.correction)

    def choose(
        self,
        num_tokens: int,
        matches: Mapping[str, TierMatch | int],
        decode: list[WorkerLoad],
        prefill: list[WorkerLoad],
        session: Affinity | None = None,
        block_hashes: frozenset[int] = frozenset(),
        takers: list[WorkerLoad] | None = None,  # flexible workers: the prefill workers that may serve it whole
    ) -> Decision:
        if not decode:
            raise ValueError("no decode workers")
        tm = {name: as_match(m) for name, m in matches.items()}
        num_blocks = cdiv(num_tokens, self.block_size)
        kind = self.config.kind
        if kind is PolicyKind.ROUND_ROBIN:
            chosen = decode[next(self._rr_decode) % len(decode)]
            costs = {}
        elif kind is PolicyKind.LEAST_LOADED:
            costs = {w.name: float(w.active_requests) for w in decode}
            chosen = self._pick(decode, costs)
        else:
            costs = {
                w.name: self._cost(w, num_blocks, tm.get(w.name, TierMatch()), session, w.shared_blocks(block_hashes))
                for w in decode
            }
            chosen = self._pick(decode, costs)
        takers = prefill if takers is None else takers
        return self._decide(chosen, costs, tm, num_tokens, num_blocks, prefill, session, takers)

    def choose_ranked(
        self,
        num_tokens: int,
        matches: Mapping[str, TierMatch | int],
        ranking: LoadRanking,
        loads: Mapping[str, WorkerLoad],
        eligible: Callable[[str], bool],
        prefill: list[WorkerLoad],
        session: Affinity | None = None,
        hashes: Sequence[int] = (),
        takers: list[WorkerLoad] | None = None,  # flexible workers (None: the prefill workers `eligible` accepts)
        scored: Scored | None = None,  # `score`'s answer for this request, when it gave one
    ) -> Decision | None:
        """`choose` over the decode workers of `ranking.order` that `eligible` accepts: the same decision, but
        under the kv policy at temperature 0 it scores only the workers that can win (router/ranking.py), and
        `Decision.costs` holds those only.  None: no such decode worker (nor, with flexible workers, an idle
        prefill worker that `eligible` accepts)."""
        picked: _Picked = _UNRANKABLE
        tm = {name: as_match(m) for name, m in matches.items()}
        num_blocks = cdiv(num_tokens, self.block_size)
        takers = [p for p in prefill if eligible(p.name)] if takers is None else takers
        if scored is not None:
            picked = self._scored_pick(scored, eligible)
        if (scored is None or picked == _UNSETTLED) and self._ranks_exactly(ranking):
            picked = self._ranked_pick(num_blocks, tm, ranking, loads, eligible, session, frozenset(hashes))
        if isinstance(picked, str):  # every worker scored, as `choose` does
            decode = [loads[n] for n in ranking.order if eligible(n)]
            if decode:
                return self.choose(num_tokens, matches, decode, prefill, session, frozenset(hashes), takers)
            picked = None
        if picked is None:  # no decode worker; with flexible workers, an idle prefill worker serves it whole
            return self.whole_on_idle(num_tokens, matches, takers) if self.config.flexible else None
        chosen, costs = picked
        return self._decide(loads[chosen], costs, tm, num_tokens, num_blocks, prefill, session, takers)

    def score(
        self, ranking: LoadRanking, hashes: Sequence[int], num_tokens: int, session: Affinity | None
    ) -> Scored | None:
        """Every decode worker's cost in one native call (router/native_score.py), with the index walk: None where
        there is no native scorer, or the policy is not the kv argmin."""
        scorer, c = ranking.scorer, self.config
        if scorer is None or c.kind is not PolicyKind.KV or c.temperature > 0:
            return None
        last = self._sessions.get(session) if session is not None else None
        weights = (c.overlap_weight, c.queue_weight, self._affinity_bonus(session))
        return scorer.score(hashes, cdiv(num_tokens, self.block_size), self.block_size, weights, last)

    def _scored_pick(self, scored: Scored, eligible: Callable[[str], bool]) -> _Picked:
        """The eligible argmin among the native candidates, ties broken as `_pick` breaks them; _UNSETTLED when
        they cannot tell (every one refused, or ties may run past the last one, while more workers were scored)."""
        if scored.unrankable:
            return _UNRANKABLE
        best, ties = math.nan, list[str]()
        for name, cost in scored.candidates():  # (cost, routing order) ascending
            if ties and cost != best:
                return self._rng.choice(ties), dict.fromkeys(ties, best)
            if eligible(name):
                best = cost
                ties.append(name)
        if not scored.complete:
            return _UNSETTLED
        return (self._rng.choice(ties), dict.fromkeys(ties, best)) if ties else None

    def _ranks_exactly(self, ranking: LoadRanking) -> bool:
        """Whether the cheapest plain workers are the first in load order (weights finite and >= 0, argmin).  Tier
        prices do not matter here: a plain worker holds none of the prompt, so its cost has no tier term."""
        c = self.config
        return (
            c.kind is PolicyKind.KV
            and not c.temperature > 0
            and math.isfinite(c.overlap_weight)
            and c.overlap_weight >= 0
            and ranking.queue_weight == c.queue_weight
            and ranking.block_size == self.block_size
            and math.isfinite(c.queue_weight)
            and c.queue_weight >= 0
        )

    def _ranked_pick(
        self,
        num_blocks: int,
        tm: dict[str, TierMatch],
        ranking: LoadRanking,
        loads: Mapping[str, WorkerLoad],
        eligible: Callable[[str], bool],
        session: Affinity | None,
        block_hashes: frozenset[int],
    ) -> tuple[str, dict[str, float]] | str | None:
        """The argmin of `_cost` over the eligible decode workers, ties broken as `_pick` breaks them."""
        order = ranking.order
        shared = ranking.sharing(block_hashes)  # the shared-blocks term of every worker that has one
        special = set(tm) | shared.keys()  # a plain worker holds none of the prompt: its cost has no tier term
        last = self._sessions.get(session) if session is not None else None
        if last is not None:
            special.add(last)
        costs = {
            n: self._cost(loads[n], num_blocks, tm.get(n, TierMatch()), session, shared.get(n, 0))
            for n in special
            if n in order and eligible(n)
        }

        def plain(n: str) -> bool:
            return n not in special and n in order and eligible(n)

        groups: list[tuple[float, set[str]]] = []  # plain groups within float noise of the cheapest
        limit = math.inf
        for key, group in ranking.groups():
            if key > limit:
                break
            member = next((n for n in group if plain(n)), None)
            if member is None:
                continue
            cost = self._cost(loads[member], num_blocks, _NO_MATCH, session, 0)  # plain: nothing cached or shared
            if not groups:  # far above any rounding of the cost: a group past it costs more
                limit = key + 1e-9 * (1.0 + abs(key) + abs(cost) + self.config.overlap_weight * num_blocks)
            groups.append((cost, group))
        scored = [*costs.values(), *(cost for cost, _ in groups)]
        if not scored:
            return None
        if any(c != c for c in scored):
            return _UNRANKABLE
        best = min(scored)
        ties = [n for n, c in costs.items() if c == best]
        for cost, group in groups:
            if cost == best:
                tied = [n for n in group if plain(n)]
                ties += tied
                costs.update(dict.fromkeys(tied, cost))
        ties.sort(key=order.__getitem__)
        return self._rng.choice(ties), costs

    def _decide(
        self,
        load: WorkerLoad,
        costs: dict[str, float],
        tm: dict[str, TierMatch],
        num_tokens: int,
        num_blocks: int,
        prefill: list[WorkerLoad],
        session: Affinity | None,
        takers: list[WorkerLoad],
    ) -> Decision:
        """The rest of a decision once its decode worker is chosen: where it prefills, whether it pulls a prefix."""
        kind, chosen = self.config.kind, load.name
        match = tm.get(chosen) or TierMatch()
        if self.config.flexible:  # the decode worker's batch is full for the TPOT target: an idle taker serves it
            taker, why = idle_taker(self.placement, load, takers, self.config.tpot_target_s)
            if taker is not None:
                return whole_decision(self.placement, taker, tm.get(taker.name, TierMatch()), num_tokens, costs, why)
        if session:
            self._remember(session, chosen)
        uncached = num_tokens - match.total * self.block_size

        def remote(workers: list[WorkerLoad]) -> list[tuple[WorkerLoad, int, int]]:
            return [
                (p, num_tokens - tm.get(p.name, TierMatch()).total * self.block_size, num_blocks - match.total)
                for p in workers
            ]

        if self.config.placement is Placement.COST:  # every option priced
            options, priced = self.placement.options(load, uncached, remote(prefill), num_tokens)
            prefill_worker, reason = cheapest(
                options, uncached, self.config.min_remote_prefill_tokens, self.config.ttft_target_s
            )
        else:  # the threshold rule, and only its choice priced (the prediction is still recorded)
            prefill_worker, reason = self._choose_prefill(uncached, num_blocks, tm, prefill)
            picked = [p for p in prefill if p.name == prefill_worker]
            options, priced = self.placement.options(load, uncached, remote(picked), num_tokens)
        decision = Decision(chosen, prefill_worker, match.total, costs, reason, match)
        chosen_option = next(o for o in options if o.worker == prefill_worker)
        decision.predicted_ttft_s, decision.ttft_factor = chosen_option.seconds, chosen_option.factor
        decision.ttft_measured = chosen_option.measured
        decision.priced_from = priced
        if prefill_worker is not None:
            decision.prefill_cached_blocks = tm.get(prefill_worker, TierMatch()).total
        if prefill_worker is None and kind is PolicyKind.KV and self.config.peer_pull:
            self._consider_peer(decision, tm, num_tokens)
        return decision

    def whole_on_idle(
        self, num_tokens: int, matches: Mapping[str, TierMatch | int], takers: list[WorkerLoad]
    ) -> Decision | None:
        """Flexible workers, when no decode worker can take the request (slots or KV full): the taker with nothing
        queued to compute and the fastest predicted step (within the TPOT target) serves it whole."""
        found = fastest_idle(self.placement, takers, self.config.tpot_target_s)
        if found is None:
            return None
        match, why = (
            as_match(matches.get(found[0].name)),
            "whole request on idle prefill worker: no decode worker has room",
        )
        return whole_decision(self.placement, found[0], match, num_tokens, {}, why)

    def _remember(self, session: Affinity, worker: str) -> None:
        self._sessions[session] = worker
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.config.max_sessions:
            self._sessions.popitem(last=False)

    def _tier_factor(self, w: WorkerLoad, tier: Tier) -> float:
        prior = self.config.cpu_load_cost if tier is Tier.CPU else self.config.disk_load_cost
        return tier_factor(w.tier_cost, tier, prior)

    def _cost(
        self,
        w: WorkerLoad,
        num_blocks: int,
        m: TierMatch,
        session: Affinity | None,
        shared: int,  # of the request's prompt blocks, those `w`'s in-flight requests already hold
    ) -> float:
        c = self.config
        uncached: float = num_blocks - m.total
        if m.cpu:  # a tier the worker serves none of the prompt from adds nothing, whatever its price
            uncached += m.cpu * self._tier_factor(w, Tier.CPU)
        if m.disk:
            uncached += m.disk * self._tier_factor(w, Tier.DISK)
        queued = w.queued_prefill_tokens / self.block_size
        # decode load after admitting it here: what is held now, plus the request's blocks not already held
        decode = w.active_blocks + num_blocks - shared
        cost = c.overlap_weight * uncached + decode + c.queue_weight * queued
        if session is not None and self._sessions.get(session) == w.name:
            cost -= self._affinity_bonus(session)
        return cost

    def _affinity_bonus(self, session: Affinity | None) -> float:
        """The pull of the worker that last served the session (or, for a LoRA request, ran its adapter)."""
        c = self.config
        return c.adapter_affinity_bonus if isinstance(session, AdapterKey) else c.affinity_bonus

    def _pick(self, workers: list[WorkerLoad], costs: dict[str, float]) -> WorkerLoad:
        temperature = self.config.temperature
        if temperature > 0:
            best = min(costs.values())
            weights = [math.exp(-(costs[w.name] - best) / temperature) for w in workers]
            return self._rng.choices(workers, weights=weights)[0]
        scored = [costs[w.name] for w in workers]
        best = min((c for c in scored if c == c), default=math.nan)  # NaN (0 x a -inf tier price) never wins
        return self._rng.choice([w for w, c in zip(workers, scored, strict=True) if c == best] or workers)

    def _choose_prefill(
        self, uncached_tokens: int, num_blocks: int, matches: dict[str, TierMatch], prefill: list[WorkerLoad]
    ) -> tuple[str | None, str]:
        if not prefill:
            return None, "aggregated"
        if uncached_tokens < self.config.min_remote_prefill_tokens:
            return None, f"local prefill: {uncached_tokens} uncached tokens"
        available = [w for w in prefill if w.queued_prefill_tokens < self.config.max_prefill_queue_tokens]
        if not available:
            return None, "local prefill: prefill workers saturated"
        if self.config.kind is PolicyKind.ROUND_ROBIN:
            return available[next(self._rr_prefill) % len(available)].name, "remote prefill"
        costs = {
            w.name: (num_blocks - matches.get(w.name, TierMatch()).total) + w.queued_prefill_tokens / self.block_size
            for w in available
        }
        return self._pick(available, costs).name, "remote prefill"

    def _consider_peer(self, decision: Decision, matches: dict[str, TierMatch], num_tokens: int) -> None:
        usable = (num_tokens - 1) // self.block_size  # the decode worker computes at least the last token
        own = decision.match.total
        best, gain = None, 0
        for name, m in matches.items():
            n = min(m.exportable, usable)
            if name != decision.decode_worker and n - own > gain:
                best, gain = name, n - own
        if best is not None and gain >= self.config.min_peer_pull_blocks:
            decision.peer_worker = best
            decision.peer_blocks = own + gain
            decision.reason += f"; pull {gain} prefix blocks from {best}"
