"""The planner's port (planner/port.py) over the routing core: the signals the planner reads - every worker's
role, liveness and exact load (router/load.py), its last heartbeat's KV size and measured prefill speed, the
capacity limits, SLO attainment over the window - and role changes carried out by the RoleChanger
(router/roles.py: routing first, then the drain, then the announcement).

`collect_signals` is also what the simulator's planner reads, so both judge the same figures.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from disagg.planner.policy import DEFAULT_PREFILL_TOKENS_PER_S, PlannerConfig, Signals, WorkerSignal
from disagg.protocol import Role
from disagg.router.admission import CapacityConfig
from disagg.router.health import HealthMonitor
from disagg.router.latency import LatencyWindow
from disagg.router.placement import PlacementModel
from disagg.router.policy import WorkerLoad
from disagg.router.roles import RoleChanger
from disagg.router.router import RouterCore


def collect_signals(
    health: HealthMonitor,
    loads: Mapping[str, WorkerLoad],
    capacity: CapacityConfig,
    latency: LatencyWindow,
    config: PlannerConfig,
    now: float | None = None,
    default_prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
    placement: PlacementModel | None = None,
) -> Signals:
    now = time.monotonic() if now is None else now
    workers = []
    for name, worker in health.workers.items():
        load = loads[name]
        stats = worker.stats
        total = stats.kv_blocks_total if stats is not None else None
        per_token = stats.prefill_s_per_token if stats is not None else None
        step = placement.measured_decode_step(load) if placement is not None else None
        workers.append(
            WorkerSignal(
                name=name,
                role=worker.role,
                routable=health.routable(name),
                queued_prefill_tokens=load.queued_prefill_tokens,
                active_requests=load.active_requests,
                max_running=capacity.max_running,
                kv_fraction=load.active_blocks / total if total else None,
                prefill_tokens_per_s=1.0 / per_token if per_token else None,
                prefill_queue_limit=capacity.max_prefill_queue_tokens,
                decode_step_s=step[0] if step is not None else None,
                decode_seq_s=step[1] if step is not None else None,
            )
        )
    ttft, tpot, finished = latency.attainment(config.ttft_slo_s, config.tpot_slo_s, config.window_s, now)
    return Signals(now, workers, ttft, tpot, finished, default_prefill_tokens_per_s)


@dataclass
class RouterPlannerPort:
    """PlannerPort over the parts of a RouterCore the planner reads, and its RoleChanger."""

    health: HealthMonitor
    loads: Mapping[str, WorkerLoad]
    capacity: CapacityConfig
    latency: LatencyWindow
    roles: RoleChanger
    default_prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    placement: PlacementModel | None = None  # prices each worker's decode step from its heartbeats' model

    @classmethod
    def of(
        cls, core: RouterCore, default_prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    ) -> RouterPlannerPort:
        return cls(
            core.health,
            core.loads,
            core.capacity,
            core.latency,
            core.roles,
            default_prefill_tokens_per_s,
            core.policy.placement,
        )

    def signals(self, config: PlannerConfig, now: float) -> Signals:
        return collect_signals(
            self.health,
            self.loads,
            self.capacity,
            self.latency,
            config,
            now,
            self.default_prefill_tokens_per_s,
            self.placement,
        )

    async def change_role(self, worker: str, role: Role, reason: str, detail: str) -> None:
        await self.roles.change(worker, role, reason=reason, detail=detail)
