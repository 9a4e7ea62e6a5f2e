"""The planner loop inside the router actor: every `interval_s`, read the signals through the port
(planner/port.py), ask the Planner, carry out at most one move (its workers' role changes together), and say why -
in logs and in /metrics (`disagg:planner_moves_total{from,to,reason}`, `disagg:planner_holds_total{reason}`,
`disagg:planner_enabled`).

Lifecycle: `start()` (on the running event loop; only when enabled) runs the rounds as one task; `stop()` cancels
it.  Its rounds, and their failure budget, are planner/rounds.py's.  The
routing core starts and stops it with its other background tasks (RouterCore.start / stop).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from disagg.planner.policy import Hold, Move, Planner, PlannerConfig, Reason
from disagg.planner.port import PlannerPort
from disagg.planner.rounds import Rounds, count_hold
from disagg.protocol import Role

log = logging.getLogger(__name__)


class PlannerLoop:
    def __init__(self, port: PlannerPort, config: PlannerConfig | None = None) -> None:
        self.port = port
        self.planner = Planner(config)
        self.config = self.planner.config
        self.rounds = Rounds("planner", self.step, self.config.interval_s)
        self.moves: Counter[tuple[Role, Role, Reason]] = Counter()  # (from, to, reason) -> workers moved
        self.holds: Counter[Hold] = Counter()  # hold reason -> rounds

    def start(self) -> None:
        if self.config.enabled:
            self.rounds.start()

    async def stop(self) -> None:
        await self.rounds.stop()

    def status(self) -> dict:
        return {
            "enabled": self.config.enabled,
            "last_hold": self.planner.last_hold.value if self.planner.last_hold else None,
            "moves": [
                {"from": a.value, "to": b.value, "reason": r.value, "count": n} for (a, b, r), n in self.moves.items()
            ],
            "holds": {hold.value: n for hold, n in self.holds.items()},
        }

    async def step(self) -> Move | Hold:
        """One round: decide, and carry out a move (waiting for its drain)."""
        now = time.monotonic()
        decision = self.planner.decide(self.port.signals(self.config, now))
        if isinstance(decision, Hold):
            return count_hold("planner", self.holds, self.planner, decision)
        self.planner.last_hold = None
        log.info(
            "planner: %s %s -> %s because %s (%s)",
            ",".join(decision.workers),
            decision.old.value,
            decision.new.value,
            decision.reason.value,
            decision.detail,
        )
        self.planner.applied(decision, now)  # counted before the drain: hysteresis covers the whole change
        self.moves[(decision.old, decision.new, decision.reason)] += len(decision.workers)
        # every worker of the move changes together: their drains overlap instead of adding up
        await asyncio.gather(
            *(
                self.port.change_role(name, decision.new, reason=decision.reason.value, detail=decision.detail)
                for name in decision.workers
            )
        )
        return decision
