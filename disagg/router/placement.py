"""Where a request's prefill runs, priced from measured cost (`--placement cost`).

For the decode worker d the policy chose (router/policy.py), the options are prefill on d itself (local) or on a
prefill worker p (remote: p computes the prompt, d reads the KV).  Each is priced as the request's time to first
token, predicted:

    local(d)  = prefill_seconds_d(queued_d + uncached_d,  beside d's decodes until they finish)
    remote(p) = prefill_seconds_p(queued_p + uncached_p)  + read_s_per_block_d * blocks d reads

`prefill_seconds` is the worker's own chunk rule applied to its own fitted step-time model (engine/step_time.py),
both from its heartbeat: a decode worker that sizes its prompt chunks to a TPOT target prefills slowly beside a
full batch, and its price says so; an idle one prefills at full speed and needs no transfer.  A step is priced
with the tokens it carries (a short uncached remainder is one short step), and the prompt's attention - over the
prefix the worker holds and over itself, chunk by chunk - counts as the engine counts key pairs.  The queue, the
uncached prompt tokens, the decoding requests and their output tokens still to come (max_tokens less those
generated) are the router's own counts (router/load.py).

Which option wins (`cheapest`): without a TTFT target, the lowest prediction, local on a tie.  With the TTFT SLO
as target, a prefill worker that meets it (the prompt leaves the decode worker's batch alone), else local if that
meets it, else the prefill worker: a request late either way should not slow the decodes of those on time.

Flexible workers (`--flexible-workers`): a prefill worker with an empty queue takes a request whole, prefill and
decode, when no decode worker has room for it (slots or KV: `RoutingPolicy.whole_on_idle`), or when the chosen
decode worker's next step would break the TPOT target with it in its batch and the prefill worker's would not
(`idle_taker`); its later remote prefills are then priced beside its decodes.

Cold start: a worker whose heartbeat carries no fitted model yet (or that sent none) is priced with the configured
prior (`PolicyConfig.prior_*`: the default model's step times on a 2-core CPU, bench/results/time_model.json),
never as free, and the decision says so (`Decision.priced_from`, counted in /metrics).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

from disagg.config import EngineConfig
from disagg.engine.step_time import ChunkRule, StepCoefficients
from disagg.protocol import PricedFrom
from disagg.router.correction import TtftCorrection
from disagg.router.decision import Decision
from disagg.router.index import TierMatch


class Placement(str, enum.Enum):
    THRESHOLD = "threshold"  # remote when the uncached part is long enough and a prefill worker has queue room
    COST = "cost"  # the option with the lowest predicted time to first token (this module)


@dataclass(frozen=True)
class WorkerTiming:
    """What a worker's heartbeat says about its speed (None: not measured yet)."""

    model: StepCoefficients | None = None
    rule: ChunkRule | None = None
    transfer_s_per_block: float | None = None


class WorkerLoad(Protocol):
    """What pricing reads of a worker's load (router/ranking.py's WorkerLoad, which holds a WorkerTiming)."""

    name: str
    active_blocks: int
    queued_compute_tokens: int
    decoding: int
    decode_tokens_left: int
    timing: WorkerTiming | None


W = TypeVar("W", bound=WorkerLoad)


class Option(NamedTuple):  # (a tuple: one is made per priced option of every decision)
    worker: str | None  # None: local prefill on the decode worker
    seconds: float  # corrected: the model's prediction times `factor`
    factor: float = 1.0  # the computing worker's correction (router/correction.py)
    measured: bool = False  # priced from the computing worker's own step-time model (not the prior)


class PlacementModel:
    def __init__(
        self,
        prior: StepCoefficients,
        prior_transfer_s_per_block: float,
        block_size: int,
        correction: TtftCorrection | None = None,
    ) -> None:
        self.prior, self.prior_transfer = prior, prior_transfer_s_per_block
        self.block_size = block_size
        self.correction = correction or TtftCorrection()
        self.default_rule = ChunkRule(0.0, EngineConfig.max_num_batched_tokens, 1, block_size)

    def _timing(self, w: WorkerLoad) -> tuple[StepCoefficients, ChunkRule, bool]:
        t = w.timing
        model = t.model if t is not None else None
        rule = t.rule if t is not None and t.rule is not None else self.default_rule
        return (model or self.prior), rule, model is not None

    def prefill_s(self, w: WorkerLoad, tokens: int, decoding: bool, cached: int = 0) -> tuple[float, bool]:
        """(seconds for `w` to compute its queue plus `tokens` - a prompt whose first `cached` tokens it holds -,
        whether priced from its own measurements)."""
        model, rule, measured = self._timing(w)
        seqs = w.decoding if decoding else 0
        context = w.active_blocks * self.block_size if decoding else 0
        queue = w.queued_compute_tokens + tokens  # its queued prompts' attention priced as if this one's length
        steps = w.decode_tokens_left / seqs if seqs else None  # its decodes' mean tokens left (their max_tokens)
        seconds = rule.prefill_seconds(model, queue, seqs, context, prompt=tokens, decode_steps=steps, cached=cached)
        return seconds, measured

    def decode_step_s(self, w: WorkerLoad) -> float:
        """`w`'s predicted decode step with one more sequence than it decodes now (each reads its context: the
        worker's active blocks spread over them), from its own fitted model or the prior."""
        model, _, _ = self._timing(w)
        seqs = w.decoding + 1
        return model.predict(seqs, seqs, w.active_blocks * self.block_size / 1000)

    def measured_decode_step(self, w: WorkerLoad) -> tuple[float, float] | None:
        """(`decode_step_s`, how much it grows per sequence more, each bringing the mean context of `w`'s) from
        `w`'s own fitted model; None before its heartbeats carry one (the planner then reads no step time rather
        than the prior's)."""
        model = w.timing.model if w.timing is not None else None
        if model is None:
            return None
        context = w.active_blocks * self.block_size / max(1, w.decoding)
        return self.decode_step_s(w), model.predict(1, 1, context / 1000) - model.base

    def read_s(self, d: WorkerLoad, blocks: int) -> float:
        t = d.timing
        per_block = t.transfer_s_per_block if t is not None and t.transfer_s_per_block else self.prior_transfer
        return per_block * blocks

    def options(
        self,
        decode: WorkerLoad,
        local_tokens: int,
        remote: Sequence[tuple[WorkerLoad, int, int]],  # (prefill worker, tokens it computes, blocks the decode reads)
        prompt_tokens: int,
    ) -> tuple[list[Option], PricedFrom]:
        """Every option priced, local first (ties go local: `min` keeps the first)."""
        seconds, measured = self.prefill_s(decode, local_tokens, decoding=True, cached=prompt_tokens - local_tokens)
        factor = self.correction.factor(decode.name)
        options = [Option(None, seconds * factor, factor, measured)]
        for p, tokens, blocks in remote:
            # a prefill worker's requests are all in its queue, unless it also serves whole ones (flexible)
            s, m = self.prefill_s(p, tokens, decoding=p.decoding > 0, cached=prompt_tokens - tokens)
            factor = self.correction.factor(p.name)
            options.append(Option(p.name, (s + self.read_s(decode, blocks)) * factor, factor, m))
            measured = measured and m
        return options, PricedFrom.MEASURED if measured else PricedFrom.PRIOR


def fastest_idle(model: PlacementModel, takers: Sequence[W], tpot_target_s: float) -> tuple[W, float] | None:
    """(the taker with nothing queued to compute and the fastest predicted decode step, that step), within the
    TPOT target when there is one; None: no such taker."""
    idle = [(model.decode_step_s(p), p.name, p) for p in takers if p.queued_compute_tokens == 0]
    idle = [t for t in idle if tpot_target_s <= 0 or t[0] <= tpot_target_s]
    if not idle:
        return None
    step, _, taker = min(idle, key=lambda t: t[:2])
    return taker, step


def idle_taker(
    model: PlacementModel, decode: WorkerLoad, takers: Sequence[W], tpot_target_s: float
) -> tuple[W | None, str]:
    """Flexible workers: the prefill worker that should serve this request whole (prefill and decode), or None.

    Only when the decode worker's next step, with this request in its batch, is predicted past the TPOT target
    (its batch is full for the SLO) and a taker (a prefill worker the router would route to, with room) with nothing
    queued to compute would decode within it: the request then adds decode capacity where prefill capacity idles,
    without a role change (router/roles.py moves workers for sustained shifts)."""
    if tpot_target_s <= 0 or (d_step := model.decode_step_s(decode)) <= tpot_target_s:
        return None, ""
    found = fastest_idle(model, takers, tpot_target_s)
    if found is None:
        return None, ""
    taker, step = found
    return taker, (
        f"whole request on idle prefill worker: decode step predicted {d_step * 1000:.0f} ms on {decode.name}, "
        f"{step * 1000:.0f} ms on {taker.name}, target {tpot_target_s * 1000:.0f} ms"
    )


def whole_decision(
    model: PlacementModel, taker: WorkerLoad, match: TierMatch, num_tokens: int, costs: dict[str, float], reason: str
) -> Decision:
    """A request served whole by the prefill worker `taker` (flexible workers): it prefills from its own cache."""
    decision = Decision(taker.name, None, match.total, costs, reason, match, flexible=True)
    uncached = num_tokens - match.total * model.block_size
    seconds, measured = model.prefill_s(taker, uncached, decoding=True, cached=num_tokens - uncached)
    decision.ttft_factor, decision.ttft_measured = model.correction.factor(taker.name), measured
    decision.predicted_ttft_s = seconds * decision.ttft_factor
    decision.priced_from = PricedFrom.MEASURED if measured else PricedFrom.PRIOR
    return decision


def cheapest(
    options: list[Option], uncached_tokens: int, min_remote_tokens: int, ttft_target_s: float = 0.0
) -> tuple[str | None, str]:
    """(the prefill worker, None for local; the reason).

    Without a TTFT target: the cheapest option, local on a tie.  With one (the TTFT SLO): a prefill worker that
    meets it, since a prompt computed there leaves the decode worker's batch alone (its TPOT); else local if that
    meets it; else, both late, the prefill worker - a request that misses its SLO anyway should not slow the
    decodes of those that met theirs.  Local always when the uncached part is shorter than `min_remote_tokens`
    (a transfer's fixed costs the model does not price)."""
    if len(options) == 1:
        return None, "aggregated"
    if uncached_tokens < min_remote_tokens:
        return None, f"local prefill: {uncached_tokens} uncached tokens"
    local = options[0].seconds
    remote = min(options[1:], key=lambda o: o.seconds)
    said = f"predicted local {local:.3f} s, remote {remote.seconds:.3f} s"
    if ttft_target_s > 0:
        if remote.seconds <= ttft_target_s or local > ttft_target_s:
            return remote.worker, f"remote prefill: {said}, target {ttft_target_s:.3f} s"
        return None, f"local prefill: {said}, target {ttft_target_s:.3f} s"
    if local <= remote.seconds:
        return None, f"local prefill: {said}"
    return remote.worker, f"remote prefill: {said}"
