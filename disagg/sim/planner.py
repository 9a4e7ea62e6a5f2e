"""The router's planner in virtual time: every `interval_s` it reads the same signals the real planner loop reads
(disagg/router/planner_port.py: the router's exact load accounting and SLO attainment over a window) and moves at
most one worker between prefill and decode through SimCluster.set_role.  SimPlanner is the simulator's
PlannerPort (disagg/planner/port.py).  The timeline of moves is kept for reports
and plots."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.planner.policy import Move, Planner, PlannerConfig, Signals
from disagg.protocol import Role
from disagg.router.planner_port import RouterPlannerPort


@dataclass
class RoleEvent:
    time_s: float
    worker: str
    old: str
    new: str
    reason: str
    detail: str


class SimPlanner:
    def __init__(self, cluster, config: PlannerConfig) -> None:
        self.cluster = cluster
        self.planner = Planner(config)
        self.config = self.planner.config
        self.timeline: list[RoleEvent] = []
        model = cluster.model  # the modelled prefill speed stands in for a worker's measured one
        self.prefill_tokens_per_s = 1.0 / max(model.per_token, 1e-6)
        self.reads = RouterPlannerPort.of(cluster.router, self.prefill_tokens_per_s)

    # PlannerPort: the real loop's signals; a role change is instant in virtual time (no drain to wait for)
    def signals(self, config: PlannerConfig, now: float) -> Signals:
        return self.reads.signals(config, now)

    async def change_role(self, worker: str, role: Role, reason: str, detail: str) -> None:
        self.cluster.set_role(worker, role)

    def start(self) -> None:
        if self.config.enabled:
            self.cluster.loop.at(self.cluster.loop.now + self.config.interval_s, self.tick)

    def tick(self) -> None:
        loop = self.cluster.loop
        signals = self.signals(self.config, loop.now)
        decision = self.planner.decide(signals)
        if isinstance(decision, Move):
            for name in decision.workers:
                self.cluster.set_role(name, decision.new)
                self.timeline.append(
                    RoleEvent(
                        loop.now, name, decision.old.value, decision.new.value, decision.reason.value, decision.detail
                    )
                )
            self.planner.applied(decision, loop.now)
        if loop.pending():  # other work is scheduled: keep planning; else the run is over
            loop.at(loop.now + self.config.interval_s, self.tick)

    def split_at(self, t: float, initial: tuple[int, int]) -> tuple[int, int]:
        """(prefill, decode-capable) workers at virtual time t."""
        p, d = initial
        for e in self.timeline:
            if e.time_s > t:
                break
            if e.new == "prefill":
                p, d = p + 1, d - 1
            elif e.old == "prefill":
                p, d = p - 1, d + 1
        return p, d
