"""One budget across models: the fleet planner's decision - should a worker leave one model for another, and why.

Pure logic (no Ray, no asyncio, clock passed in): `FleetPlanner.decide(signals)` returns at most one `FleetMove`
per call, or the `FleetHold` that says why not.

The budget is the workers that are awake.  Each model of a deployment may have standby workers (`standby` in its
entry): started with its weights, then parked - out of routing, asleep (engine/sleep.py: no KV memory, no
compute).  A move parks awake workers of a donor model (out of routing at once, drained as a role change drains,
then asleep) and wakes as many parked workers of the recipient - as soon as the donor's stop taking requests, or
once they sleep (`wake_before_drain`) - so the number of workers taking requests never grows, and the recipient
gets workers that already hold its weights (a wake, not a cold load).  The router's side carries it out
(router/parking.py; the port over every model's core: http/fleet_port.py).

Demand per model is the router's exact accounting: requests running plus requests waiting in its admission queue,
per awake decoder, as a share of `max_running` (the admission limit of one worker): 1.0 means its workers are
full, above 1 requests queue.  Rules:
1. A model is hot when its demand is above `load_high` and it has a parked worker to wake.  The hottest is the
   recipient.
2. A donor is any other model whose demand on the decoders it keeps stays at or below `donor_load_max` (so a
   quiet model keeps enough to serve what it has: a hot model cannot starve a quiet one) - their own requests and
   its queue, since a parked worker's requests finish where they are; or, when that is less, what it would hold
   at the rate it is sent now, its queue included but never less than its queue (Little's law: a model whose
   traffic just fell gives at once, not once its backlog has drained) - which keeps `min_awake` decoders, and
   which is not pinned by hysteresis.  The least loaded donor gives the workers with the fewest requests running
   (the fewest streams drain): as many as bring the recipient's demand to `target_load`, within what the donor
   can spare by rule 2 and the recipient has parked - a sharp shift is met in one move.  Requests still finishing
   on workers a model gave away are not its demand.
Hysteresis, as the role planner's (planner/policy.py): a move is made only after `confirm_rounds` rounds in a row
found the same model hot (while a donor frees up, the rounds still count: the need is what is confirmed; a demand
above `urgent_load` - twice its workers' limit by default, a queue that deep is no noise - needs none); at most
one move per `cooldown_s`; a model keeps a worker it gained at least `min_dwell_s` (and does not gain one for that
long after giving one); and a pair of models reverses its last move at most once per `reversal_window_s` - each
time counted from the end of a move (its drain can take up to `park_timeout_s`).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from disagg.protocol import Role


class FleetReason(str, enum.Enum):
    DEMAND = "demand"  # the recipient's demand is above load_high and the donor has room to spare


class FleetHold(str, enum.Enum):
    """Why no worker moved between models (a metric label, logged when it changes)."""

    DISABLED = "disabled"
    BALANCED = "balanced"  # no model is hot
    NO_STANDBY = "no_standby"  # a model is hot, but it has no parked worker to wake
    NO_DONOR = "no_donor"  # a model is hot, but every other one needs what it has (or is pinned by hysteresis)
    CONFIRMING = "confirming"
    COOLDOWN = "cooldown"


@dataclass
class FleetConfig:
    enabled: bool = field(
        default=False,
        metadata={
            "flag": "--fleet-planner",
            "help": "move awake workers between the models of a deployment from demand (standby workers: parked)",
        },
    )
    interval_s: float = 1.0
    load_high: float = 0.9  # demand per awake decoder (share of max_running) above this: the model wants a worker
    donor_load_max: float = 0.6  # a donor's demand on the decoders it keeps must stay at or below this
    # a move gives the recipient enough workers to bring its demand to this (as many as the donor can spare and
    # it has parked), so a sharp shift is met in one move rather than one worker per cooldown
    target_load: float = 0.7
    min_awake: int = 1  # awake decoders every model keeps
    confirm_rounds: int = 3
    # a demand this deep (requests queued beyond its workers' limit) is no noise: acted on without confirmation
    urgent_load: float = 2.0
    cooldown_s: float = 5.0
    min_dwell_s: float = 15.0
    reversal_window_s: float = 120.0
    park_timeout_s: float = 120.0  # a donor worker's drain (its streams finish) and sleep, at most
    # wake the recipient's workers as soon as the donor's stop taking requests (their streams finish beside the new
    # ones: the workers taking requests never grow); False: only once the donor's sleep, for workers of several
    # models that share one device's memory
    wake_before_drain: bool = True
    rate_window_s: float = 5.0  # a donor's demand: requests sent over this window ...
    latency_window_s: float = 30.0  # ... times their mean time in the system over this one (Little's law)


@dataclass
class FleetWorker:
    name: str
    role: Role
    active_requests: int
    parked: bool  # asleep and out of routing (a standby, or given away)
    routable: bool  # READY and not parked: serving now
    changing: bool = False  # a role change or a park/wake is in flight


@dataclass
class ModelSignal:
    model: str
    workers: list[FleetWorker]
    queued: int  # requests waiting in its admission queue
    max_running: int  # one worker's admission limit
    serving: bool = True  # False: being unloaded, asleep or waking - never a donor or a recipient
    # requests it would hold at the rate it is sent now (Little's law: router/load.py); None: not measured yet
    expected: float | None = None

    def awake_decoders(self) -> list[FleetWorker]:
        return [w for w in self.workers if w.routable and w.role.decodes and not w.changing]

    def standby(self) -> list[FleetWorker]:
        return [w for w in self.workers if w.parked and not w.changing]

    def demand_without(self, k: int) -> float:
        """Its demand on the awake decoders left after parking the `k` least busy: their own requests and the
        queue (a parked worker's requests finish where they are; they do not move to the others)."""
        ranked = sorted(self.awake_decoders(), key=lambda w: (w.active_requests, w.name))
        left = ranked[k:]
        wanted: float = self.queued + sum(w.active_requests for w in left)
        if self.expected is not None:  # a model sent less than it still holds: what it is sent now is what stays
            # Little's L counts the requests waiting as well as those running (their time in the system includes
            # the queue), so it is not added to the queue; but what is queued now must still be served
            wanted = min(wanted, max(self.expected, float(self.queued)))
        return wanted / (len(left) * max(1, self.max_running)) if left else (float("inf") if wanted else 0.0)

    def demand(self, decoders: int | None = None) -> float:
        """Requests running and queued per awake decoder, as a share of max_running (over `decoders` if given).
        Requests still finishing on workers it gave away (parked) are not its awake workers' load."""
        n = len(self.awake_decoders()) if decoders is None else decoders
        wanted = self.queued + sum(w.active_requests for w in self.workers if not w.parked)
        if n <= 0:
            return float("inf") if wanted else 0.0
        return wanted / (n * max(1, self.max_running))


@dataclass
class FleetSignals:
    now: float
    models: list[ModelSignal]


@dataclass
class FleetMove:
    donor: str  # model
    recipient: str  # model
    park: list[str]  # the donor's workers that drain and sleep (together: their drains overlap)
    wake: list[str]  # as many of the recipient's parked workers, woken once those sleep
    reason: FleetReason
    detail: str


@dataclass
class _Moves:
    at: deque = field(default_factory=lambda: deque(maxlen=16))  # (time, donor, recipient)
    reversals: deque = field(default_factory=lambda: deque(maxlen=16))  # times, per unordered pair below


class FleetPlanner:
    def __init__(self, config: FleetConfig | None = None) -> None:
        self.config = config or FleetConfig()
        self.last_move_at: float | None = None
        self.last_hold: FleetHold | None = None
        self.gained: dict[str, float] = {}  # model -> when it last gained a worker
        self.gave: dict[str, float] = {}  # model -> when it last gave one
        self.pairs: dict[frozenset[str], _Moves] = {}
        self._streak: tuple[str | None, int] = (None, 0)  # the recipient asked for, rounds in a row

    def decide(self, s: FleetSignals) -> FleetMove | FleetHold:
        cfg = self.config
        if not cfg.enabled:
            return FleetHold.DISABLED
        serving = [m for m in s.models if m.serving]
        hot = sorted((m for m in serving if m.demand() > cfg.load_high), key=lambda m: -m.demand())
        if not hot:
            self._streak = (None, 0)
            return FleetHold.BALANCED
        recipients = [m for m in hot if m.standby() and not self._pinned(m.model, self.gave, s.now)]
        if not recipients:
            self._streak = (None, 0)
            return FleetHold.NO_STANDBY
        recipient = recipients[0]
        # the recipient's need is what is confirmed, round after round, while a donor may still be freeing up
        streak = self._streak[1] + 1 if self._streak[0] == recipient.model else 1
        self._streak = (recipient.model, streak)
        donors = sorted(
            (m for m in serving if m is not recipient and self._may_give(m, recipient.model, s.now)),
            key=lambda m: m.demand_without(1),
        )
        if not donors:
            return FleetHold.NO_DONOR
        if streak < cfg.confirm_rounds and recipient.demand() <= cfg.urgent_load:
            return FleetHold.CONFIRMING
        if self.last_move_at is not None and s.now - self.last_move_at < cfg.cooldown_s:
            return FleetHold.COOLDOWN
        donor = donors[0]
        k = min(self._wanted(recipient), self._spare(donor), len(recipient.standby()))
        park = sorted(donor.awake_decoders(), key=lambda w: (w.active_requests, w.name))[:k]
        wake = sorted(recipient.standby(), key=lambda w: w.name)[:k]
        detail = (
            f"{recipient.model} demand={recipient.demand():.2f} on {len(recipient.awake_decoders())}; "
            f"{donor.model} demand={donor.demand():.2f} on {len(donor.awake_decoders())}"
        )
        return FleetMove(
            donor.model, recipient.model, [w.name for w in park], [w.name for w in wake], FleetReason.DEMAND, detail
        )

    def _wanted(self, recipient: ModelSignal) -> int:
        """Workers the recipient needs to bring its demand down to `target_load` (at least one)."""
        n, most = len(recipient.awake_decoders()), len(recipient.awake_decoders()) + len(recipient.standby())
        need = n + 1
        while need < most and recipient.demand(need) > self.config.target_load:
            need += 1
        return need - n

    def _spare(self, donor: ModelSignal) -> int:
        """Workers the donor can give and stay at or below `donor_load_max`, keeping `min_awake` (at least one:
        it is a donor)."""
        n = len(donor.awake_decoders())
        k = 1
        while n - k - 1 >= self.config.min_awake and donor.demand_without(k + 1) <= self.config.donor_load_max:
            k += 1
        return k

    def _may_give(self, donor: ModelSignal, recipient: str, now: float) -> bool:
        cfg = self.config
        n = len(donor.awake_decoders())
        if n - 1 < cfg.min_awake or donor.demand_without(1) > cfg.donor_load_max:
            return False
        if self._pinned(donor.model, self.gained, now):
            return False
        moves = self.pairs.get(frozenset((donor.model, recipient)))
        if moves is None or not moves.at:
            return True
        _, last_donor, _ = moves.at[-1]
        reversal = last_donor == recipient  # the last move between these two went the other way
        return not (reversal and any(now - t < cfg.reversal_window_s for t in moves.reversals))

    def _pinned(self, model: str, when: dict[str, float], now: float) -> bool:
        at = when.get(model)
        return at is not None and now - at < self.config.min_dwell_s

    def applied(self, move: FleetMove, now: float) -> None:
        """Record a move that was carried out (hysteresis counts only real moves)."""
        moves = self.pairs.setdefault(frozenset((move.donor, move.recipient)), _Moves())
        if moves.at and moves.at[-1][1] == move.recipient:
            moves.reversals.append(now)
        moves.at.append((now, move.donor, move.recipient))
        self.gained[move.recipient] = now
        self.gave[move.donor] = now
        self.last_move_at = now
        self._streak = (None, 0)
