"""The fleet planner's loop (planner/fleet.py) in the router's process: every `interval_s`, read every model's
signals through the port, ask the FleetPlanner, carry out at most one move (park the donor's worker, then wake the
recipient's), and say why - in logs and in /metrics (`disagg:fleet_moves_total{donor,recipient,reason}`,
`disagg:fleet_holds_total{reason}`) and at `GET /admin/fleet`.

Lifecycle: `start()` (on the running event loop; only when enabled) runs the rounds as one task; `stop()` cancels
it.  Its rounds, and their failure budget, are planner/rounds.py's.  The HTTP
app's lifespan starts it after the models' cores and stops it before them (http/app.py).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import Protocol

from disagg.planner.fleet import FleetConfig, FleetHold, FleetMove, FleetPlanner, FleetReason, FleetSignals
from disagg.planner.rounds import Rounds, count_hold

log = logging.getLogger(__name__)


class FleetPort(Protocol):
    """The seam between the fleet planner and the models it plans for (the router's: http/fleet_port.py)."""

    def signals(self, now: float) -> FleetSignals:
        """Every model's workers (awake, parked, in flight) and demand, as of `now`."""
        ...

    async def move(self, move: FleetMove, timeout_s: float) -> None:
        """Park `move.park` (out of routing, drained, asleep) and wake as many of `move.wake` into routing (see
        FleetConfig.wake_before_drain for when).  Raises DisaggError if a park or a wake failed, once the two
        sides are evened out (no more workers take requests than before, and no fewer)."""
        ...


class FleetLoop:
    def __init__(self, port: FleetPort, config: FleetConfig | None = None) -> None:
        self.port = port
        self.planner = FleetPlanner(config)
        self.config = self.planner.config
        self.rounds = Rounds("fleet planner", self.step, self.config.interval_s)
        self.moves: Counter[tuple[str, str, FleetReason]] = Counter()  # (donor, recipient, reason) -> workers
        self.failed = 0  # moves that failed (the park or the wake raised)
        self.holds: Counter[FleetHold] = Counter()
        self.last: FleetSignals | None = None  # what the last round read (/admin/fleet, /metrics)
        self.recent: deque[dict[str, object]] = deque(maxlen=64)  # the last moves, each with when and how long

    def start(self) -> None:
        if self.config.enabled:
            self.rounds.start()

    async def stop(self) -> None:
        await self.rounds.stop()

    def status(self) -> dict[str, object]:
        return {
            "enabled": self.config.enabled,
            "last_hold": self.planner.last_hold.value if self.planner.last_hold else None,
            "moves": [
                {"donor": d, "recipient": r, "reason": why.value, "count": n} for (d, r, why), n in self.moves.items()
            ],
            "failed_moves": self.failed,
            "recent": list(self.recent),
            "holds": {hold.value: n for hold, n in self.holds.items()},
            "models": {
                m.model: {
                    "awake": [w.name for w in m.awake_decoders()],
                    "parked": [w.name for w in m.workers if w.parked],
                    "demand": round(m.demand(), 3),
                    "expected": None if m.expected is None else round(m.expected, 2),
                    "queued": m.queued,
                }
                for m in (self.last.models if self.last is not None else [])
            },
        }

    async def step(self) -> FleetMove | FleetHold:
        """One round: decide, and carry out a move (waiting for the donor's drain and both workers' sleep/wake)."""
        now = time.monotonic()
        self.last = signals = self.port.signals(now)
        decision = self.planner.decide(signals)
        if isinstance(decision, FleetHold):
            return count_hold("fleet planner", self.holds, self.planner, decision)
        self.planner.last_hold = None
        log.info(
            "fleet planner: %s (%s) -> %s (%s) because %s (%s)",
            ",".join(decision.park),
            decision.donor,
            ",".join(decision.wake),
            decision.recipient,
            decision.reason.value,
            decision.detail,
        )
        record: dict[str, object] = {"at": time.time(), "donor": decision.donor, "recipient": decision.recipient}
        record.update(park=decision.park, wake=decision.wake, detail=decision.detail)
        self.recent.append(record)
        try:
            await self.port.move(decision, self.config.park_timeout_s)
        except Exception as exc:
            self.failed += 1
            record["error"] = f"{type(exc).__name__}: {exc}"
            # evened out, so nothing moved: only the cooldown, so a broken worker is not tried every round (no
            # dwell, no pair history: the next real move back is no reversal)
            self.planner.last_move_at = time.monotonic()
            raise
        finally:
            record["seconds"] = round(time.monotonic() - now, 3)
        # hysteresis counts from the move's end (a drain can take up to park_timeout_s): the dwell and the cooldown
        # are time the workers have served where they are
        self.planner.applied(decision, time.monotonic())
        self.moves[(decision.donor, decision.recipient, decision.reason)] += len(decision.wake)
        return decision
