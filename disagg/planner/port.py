"""The planner's port: the one seam between planning and whatever it plans for.  The planner reads `signals`
(every worker's role, liveness and load, SLO attainment over a window) and acts by `change_role` - nothing else.

The serving cluster's side is router/planner_port.py (RouterPlannerPort: the routing core's exact accounting, and
role changes that drain through router/roles.py); the simulator's is its SimPlanner (virtual time, instant
changes).  The planner package imports neither.
"""

from __future__ import annotations

from typing import Protocol

from disagg.planner.policy import PlannerConfig, Signals
from disagg.protocol import Role


class PlannerPort(Protocol):
    def signals(self, config: PlannerConfig, now: float) -> Signals:
        """The figures one planning round judges, as of `now` (the SLO window and thresholds come from config)."""
        ...

    async def change_role(self, worker: str, role: Role, reason: str, detail: str) -> None:
        """Move `worker` to `role`; returns once the change is done (its old-role work drained, or timed out)."""
        ...
