"""The planner's decision: given what the router measures now, should one worker change role, and why.

Pure logic (no Ray, no asyncio, clock passed in): `Planner.decide(signals)` returns at most one `Move` per call.

Signals are the router's own exact accounting (prompt tokens queued for prefill per worker, requests decoding
per worker, KV blocks in use from heartbeats) and SLO attainment over a window of finished requests.

What a role buys here: a decode worker also prefills its own prompts (when the router keeps them local), so a
prefill-only worker adds no compute - it isolates prefill from decode steps, which protects TPOT, at the price
of a queue in front of it.  Rules, in order (each move keeps at least `min_decode` decode-capable workers and
`min_prefill` prefill ones):
1. TTFT missed and TPOT missed: capacity, not the split, is short - no move helps (hold, reason "saturated") -
   unless the decoders prefill prompts (the pool full or absent) and are not full (see rule 3), TPOT is the
   worse met and TTFT met for at least `split_ttft_floor`: those TPOT misses are the prompts' (rule 2), and the
   TTFT side can pay a split's price in prefill throughput (past `decode_load_low`: hold "decode_headroom").
2. TPOT missed (attainment < target, or decode load > `decode_load_high`) while decode workers are prefilling
   prompts themselves (prompt tokens queued on them: prefill interference) because the prefill pool is full
   (every prefill worker at its queue limit, or none): decode workers become prefill workers - the least loaded
   ones, so the fewest streams drain.  Only while decode load is under `decode_load_low` (and only so many that
   the rest stay under it): the split trades decode capacity for isolation, which a busy decode pool cannot
   spare (at 2x the conversation load in the simulator, splitting from 0.75 load took 12 of 16 workers off
   decode, 0.89x of aggregated).  The decoders' prompts k x `prefill_wait_high_s` deep move k steps at once.
   While the pool has room, the prompts decode workers prefill are the ones the router keeps local by design
   (short, or mostly cached): more prefill workers would not take them.
3. TPOT missed without fixable interference, and decode is full - its load past `decode_load_high` or its steps
   alone (each worker's measured step model) past `decode_step_high` of the TPOT SLO: prefill workers with the
   shortest queues become decode workers, never so many that the prompts' estimated wait passes
   `prefill_wait_high_s`.  Steps well within the SLO say the misses come from prompts prefilled beside the
   decodes, which another decoder would not take: hold ("decode_not_full").  Unmeasured steps count as full.
4. Prompts wait at the prefill workers (estimated wait > `prefill_wait_high_s`), or TTFT is missed while prompts
   still wait (> `prefill_wait_low_s`), and TPOT is met: the router keeps long prompts on the prefill pool while
   it is under its queue limit, so that pool is the bottleneck - decode workers become prefill workers, never
   so many that the rest pass `decode_load_high` or their predicted steps (their streams spread over fewer
   workers, at each one's measured growth per stream) pass `decode_step_max` of the TPOT SLO.
   A TTFT miss alone is history (the window holds the last 30 s): with no prompt waiting now, another prefill
   worker would not help.  Without a prefill pool (aggregated workers) this rule does not split one off: the
   prompts wait for compute, which a prefill-only worker does not add (hold "no_split_helps"; the first
   prefill worker it made at 16 aggregated workers drew every long prompt, and the rule then moved 13 more).
5. Prefill workers idle (estimated wait ~0) while decode is busier than `decode_load_low`: they move to decode.
The last prefill worker leaves (ending disaggregation) only when TPOT is measured to be missed, not on a load
proxy (KV use, idle prefill).
A move takes up to `step_fraction` of the workers at once (at least one), so a large cluster crosses a wide gap
in a few rounds; a prefill backlog k times `prefill_wait_high_s` takes up to k such steps at once (at most
`max_step_multiple`): a backlog that deep needs that many more prefill workers, and waiting one cooldown per
step lets it grow.
Hysteresis: a move must be asked for `confirm_rounds` rounds in a row; at most one move per `cooldown_s`; a
worker stays in a role at least `min_dwell_s`; and a worker
reverses a move (back to the role it just left) at most once per `reversal_window_s` - so no flapping.
The measurements behind these rules are in docs/benchmarks.md ("Why the planner's rules are what they are").
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from disagg.protocol import Role

# a worker's prefill speed until its heartbeats have measured it (the planner's only prior; it only orders
# workers' estimated waits until the first measurement)
DEFAULT_PREFILL_TOKENS_PER_S = 2000.0


class Reason(str, enum.Enum):
    PREFILL_INTERFERENCE = "prefill_interference"  # TPOT suffers from prompts prefilled on decode workers
    DECODE_SATURATED = "decode_saturated"  # TPOT suffers, decode is simply full
    PREFILL_BACKLOG = "prefill_backlog"  # TTFT suffers from the queue at the prefill-only workers
    PREFILL_IDLE = "prefill_idle"


class Hold(str, enum.Enum):
    """Why no move was made (exported as a metric label, logged when it changes)."""

    DISABLED = "disabled"
    NO_DATA = "no_data"
    BALANCED = "balanced"
    SATURATED = "saturated"  # both sides short: adding to one starves the other
    COOLDOWN = "cooldown"
    NO_CANDIDATE = "no_candidate"  # a move is wanted but every candidate is pinned by min counts or hysteresis
    CONFIRMING = "confirming"  # a move is wanted, not yet for confirm_rounds rounds in a row
    LAST_PREFILL = "last_prefill"  # only a measured TPOT miss ends disaggregation, not a load proxy
    DECODE_HEADROOM = "decode_headroom"  # prefill is short, but fewer decode workers would be overloaded
    PREFILL_HEADROOM = "prefill_headroom"  # decode is short, but fewer prefill workers would let prompts wait
    NO_SPLIT_HELPS = "no_split_helps"  # TTFT suffers on aggregated workers: a prefill-only one adds no compute
    DECODE_NOT_FULL = "decode_not_full"  # TPOT suffers, yet decode steps alone are well within it: no decoder helps


@dataclass
class PlannerConfig:
    enabled: bool = field(  # off unless turned on (`disagg serve --planner`)
        default=False,
        metadata={
            "flag": "--planner",
            "help": "let the planner move workers between prefill and decode at runtime to keep the SLOs below",
        },
    )
    interval_s: float = 2.0
    window_s: float = 30.0  # SLO attainment over requests finished in this window
    min_samples: int = 8  # fewer finished requests in the window: attainment is not judged
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.2
    target_attainment: float = 0.9
    prefill_wait_high_s: float = 1.0  # estimated wait for the queued prompts above this: prefill is short
    prefill_wait_low_s: float = 0.2  # below this prefill has slack
    decode_load_high: float = 0.85  # share of max_running (or of KV) above this: decode is short
    decode_load_low: float = 0.5
    # decode is full for the TPOT SLO when its steps alone (measured models) take this share of it: below, a TPOT
    # miss comes from prompts prefilled beside the decodes, which more decode workers would not take
    decode_step_high: float = 0.7
    # workers leave decode only while the rest's predicted steps (their streams spread over fewer) stay under this
    # share of the TPOT SLO
    decode_step_max: float = 0.9
    # both SLOs missed: an interference split is tried only while TTFT is met for at least this share (below it,
    # prefill throughput is short and a split takes more of it)
    split_ttft_floor: float = 0.75
    confirm_rounds: int = 3  # a move is made only after this many rounds in a row asked for it
    step_fraction: float = 0.1  # workers moved at once, as a share of the cluster (at least 1)
    max_step_multiple: int = 4  # a prefill backlog k x prefill_wait_high_s deep moves up to k steps at once
    cooldown_s: float = 10.0  # between two moves anywhere
    min_dwell_s: float = 20.0  # a worker keeps a role at least this long
    reversal_window_s: float = 120.0  # at most one reversal per worker in this window
    min_decode: int = 1
    min_prefill: int = 0


@dataclass
class WorkerSignal:
    name: str
    role: Role
    routable: bool
    queued_prefill_tokens: int
    active_requests: int
    max_running: int
    kv_fraction: float | None = None  # KV blocks in use / total, from heartbeats
    prefill_tokens_per_s: float | None = None  # measured by the worker
    prefill_queue_limit: int | None = None  # the router sends no more remote prefills past this (CapacityConfig)
    decode_step_s: float | None = None  # its decode step with one more sequence, from its measured step model
    decode_seq_s: float | None = None  # how much that step grows per sequence more (with its mean context)

    @property
    def decode_load(self) -> float:
        load = self.active_requests / max(1, self.max_running)
        return max(load, self.kv_fraction or 0.0)


@dataclass
class Signals:
    now: float
    workers: list[WorkerSignal]
    ttft_attainment: float | None
    tpot_attainment: float | None
    finished: int  # requests finished in the window
    default_prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S

    def prefill_workers(self) -> list[WorkerSignal]:
        return [w for w in self.workers if w.routable and w.role is Role.PREFILL]

    def decode_workers(self) -> list[WorkerSignal]:
        return [w for w in self.workers if w.routable and w.role.decodes]

    def prefill_wait_s(self) -> float:
        """Estimated wait of the prompts queued for prefill: on the prefill workers if there are any, else on the
        decode workers (which then prefill their own), each at its measured speed."""
        return self._wait(self.prefill_workers() or self.decode_workers())

    def decoders_wait_s(self) -> float:
        """Estimated wait of the prompts the decode workers prefill themselves."""
        return self._wait(self.decode_workers())

    def _wait(self, pool: list[WorkerSignal]) -> float:
        if not pool:
            return 0.0
        waits = [w.queued_prefill_tokens / (w.prefill_tokens_per_s or self.default_prefill_tokens_per_s) for w in pool]
        return sum(waits) / len(waits)

    def prefill_pool_full(self) -> bool:
        """No prefill worker can take a remote prefill now (or there is none): prompts stay on decode workers."""
        return all(
            w.prefill_queue_limit is not None and w.queued_prefill_tokens >= w.prefill_queue_limit
            for w in self.prefill_workers()
        )

    def decode_step_s(self) -> float | None:
        """The decode workers' mean predicted decode step (prompts aside); None: none measured yet."""
        steps = [w.decode_step_s for w in self.decode_workers() if w.decode_step_s is not None]
        return sum(steps) / len(steps) if steps else None

    def decode_load(self) -> float:
        decoders = self.decode_workers()
        return sum(w.decode_load for w in decoders) / len(decoders) if decoders else 0.0


@dataclass
class Move:
    workers: list[str]  # moved together, all from `old` to `new`
    old: Role
    new: Role
    reason: Reason
    detail: str

    @property
    def worker(self) -> str:
        return self.workers[0]


@dataclass
class _History:
    roles: deque = field(default_factory=lambda: deque(maxlen=8))  # (time, old, new)
    reversals: deque = field(default_factory=lambda: deque(maxlen=8))  # times


class Planner:
    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = config or PlannerConfig()
        self.last_move_at: float | None = None
        self.history: dict[str, _History] = {}
        self.last_hold: Hold | None = None
        self._streak: tuple[Role | None, int] = (None, 0)  # the direction asked for, rounds in a row
        # the decoders' prompt wait over the last confirm_rounds rounds: an interference split is sized from their
        # mean, not one round's (a 1.3 s round between 4.7 s and 0.7 s split 1 worker off, and 4 more 32 s later)
        self._decoder_waits: deque[float] = deque(maxlen=max(1, self.config.confirm_rounds))

    # ------------------------------------------------------------------ the decision
    def decide(self, s: Signals) -> Move | Hold:
        cfg = self.config
        if not cfg.enabled:
            return Hold.DISABLED
        judged = s.finished >= cfg.min_samples
        ttft_bad = judged and s.ttft_attainment is not None and s.ttft_attainment < cfg.target_attainment
        tpot_bad = judged and s.tpot_attainment is not None and s.tpot_attainment < cfg.target_attainment
        wait, load = s.prefill_wait_s(), s.decode_load()
        decode_short = tpot_bad or load > cfg.decode_load_high
        backlog = bool(s.prefill_workers()) and wait > cfg.prefill_wait_high_s
        prefill_short = backlog or (ttft_bad and wait > cfg.prefill_wait_low_s)
        interference = s.prefill_pool_full() and any(w.queued_prefill_tokens for w in s.decode_workers())
        if ttft_bad and tpot_bad and not (interference and self._tpot_binds(s, load)):
            self._streak = (None, 0)
            return Hold.SATURATED
        if not s.prefill_workers() and prefill_short and not decode_short:  # rule 4 needs a pool to be short
            self._streak = (None, 0)
            return Hold.NO_SPLIT_HELPS
        if not judged and not (prefill_short or decode_short):
            return Hold.NO_DATA
        detail = (
            f"ttft_ok={_pct(s.ttft_attainment)} tpot_ok={_pct(s.tpot_attainment)} "
            f"prefill_wait={wait:.2f}s decode_load={load:.2f} "
            f"decoders_prefilling={sum(w.queued_prefill_tokens for w in s.decode_workers())}tok "
            f"decode_step={_ms(s.decode_step_s())}"
        )
        wanted: tuple[Role, Reason] | None = None
        if decode_short and interference:
            wanted = (Role.PREFILL, Reason.PREFILL_INTERFERENCE)
        elif decode_short and s.prefill_workers():
            if not self._decode_full(s, load):
                self._streak = (None, 0)
                return Hold.DECODE_NOT_FULL
            wanted = (Role.DECODE, Reason.DECODE_SATURATED)
        elif prefill_short and not decode_short:
            wanted = (Role.PREFILL, Reason.PREFILL_BACKLOG)
        elif s.prefill_workers() and wait < cfg.prefill_wait_low_s * 0.1 and load > cfg.decode_load_low:
            wanted = (Role.DECODE, Reason.PREFILL_IDLE)
        direction = wanted[0] if wanted is not None else None
        streak = self._streak[1] + 1 if direction is not None and direction is self._streak[0] else 1
        self._streak = (direction, streak)
        self._decoder_waits.append(s.decoders_wait_s())  # a move needs confirm_rounds of these in a row
        if wanted is None:
            return Hold.BALANCED
        if streak < cfg.confirm_rounds:
            return Hold.CONFIRMING
        if self.last_move_at is not None and s.now - self.last_move_at < cfg.cooldown_s:
            return Hold.COOLDOWN
        # only a measured TPOT miss ends disaggregation: otherwise the prefill pool keeps at least one worker
        keep_prefill = cfg.min_prefill if tpot_bad else max(cfg.min_prefill, 1)
        steps, cap = 1, None
        if wanted[1] is Reason.PREFILL_INTERFERENCE:
            deep = sum(self._decoder_waits) / len(self._decoder_waits)
            steps = max(1, min(cfg.max_step_multiple, int(deep / cfg.prefill_wait_high_s)))
            cap = self._decode_headroom(s, load, cfg.decode_load_low)
            if cap == 0:
                return Hold.DECODE_HEADROOM
        if wanted[1] is Reason.PREFILL_BACKLOG:
            if backlog:
                steps = min(cfg.max_step_multiple, int(wait / cfg.prefill_wait_high_s))
            cap = self._decode_headroom(s, load)
            if cap == 0:
                return Hold.DECODE_HEADROOM
        elif wanted[1] is Reason.DECODE_SATURATED:
            cap = self._prefill_headroom(s, wait)
            if cap == 0:
                return Hold.PREFILL_HEADROOM
        chosen = self._candidates(s, wanted[0], keep_prefill, steps)[:cap]
        if not chosen:
            ending = wanted[0] is Role.DECODE and bool(self._candidates(s, Role.DECODE, cfg.min_prefill))
            return Hold.LAST_PREFILL if ending else Hold.NO_CANDIDATE
        return Move([w.name for w in chosen], chosen[0].role, wanted[0], wanted[1], detail)

    def _tpot_binds(self, s: Signals, load: float) -> bool:
        """Both SLOs missed, TPOT the worse, while the decoders' measured steps alone are well within it: the prompts
        prefilled beside them cost the misses.  A split costs prefill throughput, so not with TTFT met for under
        `split_ttft_floor` (conversation, 1/4 lengths: splits at TTFT 29% and 34% served 0.60x and 0.36x)."""
        ttft, tpot = s.ttft_attainment, s.tpot_attainment
        if ttft is None or tpot is None:
            return False
        return self.config.split_ttft_floor <= ttft and tpot < ttft and not self._decode_full(s, load)

    def _decode_full(self, s: Signals, load: float) -> bool:
        """Whether decode itself is short: its load past `decode_load_high`, or its steps alone (measured) near the
        TPOT SLO.  Unmeasured steps count as full (a TPOT miss then reads as decode capacity, as before)."""
        step = s.decode_step_s()
        cfg = self.config
        return load > cfg.decode_load_high or step is None or step >= cfg.decode_step_high * cfg.tpot_slo_s

    def _decode_headroom(self, s: Signals, load: float, high: float | None = None) -> int:
        """How many decode workers can leave for prefill before the rest pass `high` (`decode_load_high` unless
        given; their load spread over fewer workers) or their predicted steps pass `decode_step_max` of the TPOT
        SLO.  The router fills the prefill pool up to its queue limit whenever prompts arrive faster than it
        drains, so a prefill backlog alone never says when to stop: at 8x the agent load the planner kept moving
        decode workers until 6 were left at 84% load."""
        high = self.config.decode_load_high if high is None else high
        return min(_room(len(s.decode_workers()), load, high), self._step_room(s))

    def _step_room(self, s: Signals) -> int:
        """How many decode workers can leave before the rest's predicted decode step (each taking a share of the
        leavers' streams at its measured growth per sequence) passes `decode_step_max` of the TPOT SLO; no bound
        before any step is measured.  Load (slots, KV) alone let the agent load at a 50 ms TPOT SLO move 42 of 64
        workers to prefill while each step was already 40 ms: the rest then missed TPOT, and both SLOs failed."""
        decoders = s.decode_workers()
        n, step = len(decoders), s.decode_step_s()
        growths = [w.decode_seq_s * w.active_requests for w in decoders if w.decode_seq_s is not None]
        if step is None or not growths:
            return n
        growth = sum(growths) / len(growths)
        slack = self.config.decode_step_max * self.config.tpot_slo_s - step
        if slack <= 0:
            return 0
        if growth <= 0:
            return n
        x = slack / growth  # k leaving put k / (n - k) of a worker's streams on each of the rest
        return int(n * x / (1 + x))

    def _prefill_headroom(self, s: Signals, wait: float) -> int:
        """How many prefill workers can leave for decode before the queued prompts' estimated wait (spread over
        fewer workers) passes `prefill_wait_high_s`; not a bound on ending disaggregation (no pool left to wait)."""
        n = len(s.prefill_workers())
        if n <= 1:  # the last prefill worker leaving ends disaggregation: the LAST_PREFILL rule's call
            return n
        return _room(n, wait, self.config.prefill_wait_high_s)

    def _candidates(self, s: Signals, to: Role, keep_prefill: int, steps: int = 1) -> list[WorkerSignal]:
        """Up to `steps` steps of workers that may move to `to`, keeping `min_decode` decode-capable workers and
        `keep_prefill` prefill ones."""
        cfg = self.config
        if to is Role.PREFILL:
            pool = s.decode_workers()
            spare = len(pool) - cfg.min_decode
            ranked = sorted(pool, key=lambda w: (w.active_requests, w.name))
        else:
            pool = s.prefill_workers()
            spare = len(pool) - keep_prefill
            ranked = sorted(pool, key=lambda w: (w.queued_prefill_tokens, w.name))
        step = max(1, int(len(s.workers) * cfg.step_fraction)) * max(1, steps)
        eligible = [w for w in ranked if w.role is ranked[0].role and self._may_move(w.name, w.role, to, s.now)]
        return eligible[: max(0, min(step, spare))]

    def _may_move(self, name: str, old: Role, new: Role, now: float) -> bool:
        h = self.history.get(name)
        if h is None or not h.roles:
            return True
        last_at, last_old, _ = h.roles[-1]
        if now - last_at < self.config.min_dwell_s:
            return False
        reversal = new is last_old
        return not (reversal and any(now - t < self.config.reversal_window_s for t in h.reversals))

    # ------------------------------------------------------------------ bookkeeping
    def applied(self, move: Move, now: float) -> None:
        """Record a move that was carried out (hysteresis counts only real changes)."""
        for name in move.workers:
            h = self.history.setdefault(name, _History())
            if h.roles and move.new is h.roles[-1][1]:
                h.reversals.append(now)
            h.roles.append((now, move.old, move.new))
        self.last_move_at = now
        self._streak = (None, 0)


def _room(n: int, level: float, high: float) -> int:
    """How many of `n` workers can leave a pool whose per-worker level (load, wait) then rises as n / remaining,
    before it passes `high`: all of them at level 0."""
    return n if level <= 0 else max(0, int(n * (1 - level / high)))


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.0f}ms"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"
