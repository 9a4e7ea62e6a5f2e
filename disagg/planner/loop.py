"""The planner loop inside the router actor: every `interval_s`, read the router's signals, ask the Planner, carry
out at most one role change (router/roles.py), and say why - in logs and in /metrics
(`disagg:planner_moves_total{from,to,reason}`, `disagg:planner_holds_total{reason}`, `disagg:planner_enabled`).

`collect_signals` is also what the simulator's planner reads, so both judge the same figures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from disagg.planner.policy import Hold, Move, Planner, PlannerConfig, Signals, WorkerSignal
from disagg.protocol import WorkerState

if TYPE_CHECKING:
    from disagg.router.router import RouterCore

log = logging.getLogger(__name__)


def collect_signals(
    core: RouterCore, config: PlannerConfig, now: float | None = None, default_prefill_tokens_per_s: float = 2000.0
) -> Signals:
    now = time.monotonic() if now is None else now
    workers = []
    for name, health in core.health.workers.items():
        load = core.loads[name]
        stats = health.stats
        total = stats.kv_blocks_total if stats is not None else None
        per_token = stats.prefill_s_per_token if stats is not None else None
        workers.append(
            WorkerSignal(
                name=name,
                role=health.role,
                routable=health.state is WorkerState.READY,
                queued_prefill_tokens=load.queued_prefill_tokens,
                active_requests=load.active_requests,
                max_running=core.capacity.max_running,
                kv_fraction=load.active_blocks / total if total else None,
                prefill_tokens_per_s=1.0 / per_token if per_token else None,
                prefill_queue_limit=core.capacity.max_prefill_queue_tokens,
            )
        )
    ttft, tpot, finished = core.latency.attainment(config.ttft_slo_s, config.tpot_slo_s, config.window_s, now)
    return Signals(now, workers, ttft, tpot, finished, default_prefill_tokens_per_s)


class PlannerLoop:
    def __init__(self, core: RouterCore, config: PlannerConfig | None = None) -> None:
        self.core = core
        self.planner = Planner(config)
        self.config = self.planner.config
        self.moves: Counter = Counter()  # (from, to, reason) -> count
        self.holds: Counter = Counter()  # hold reason -> count
        self._task: asyncio.Task | None = None
        self.max_failures = 20  # consecutive failed rounds before the loop stops trying (and says so)

    def start(self) -> None:
        if self.config.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.step()
                failures = 0
            except Exception:  # a round that fails must not end planning; a run of them does, loudly
                failures += 1
                log.exception("planner round failed (%d in a row)", failures)
                if failures >= self.max_failures:
                    log.error("planner stopped after %d failed rounds", failures)
                    return

    def status(self) -> dict:
        return {
            "enabled": self.config.enabled,
            "last_hold": self.planner.last_hold.value if self.planner.last_hold else None,
            "moves": [{"from": a, "to": b, "reason": r, "count": n} for (a, b, r), n in self.moves.items()],
            "holds": dict(self.holds),
        }

    async def step(self) -> Move | Hold:
        """One round: decide, and carry out a move (waiting for its drain)."""
        now = time.monotonic()
        decision = self.planner.decide(collect_signals(self.core, self.config, now))
        if isinstance(decision, Hold):
            self.holds[decision.value] += 1
            if decision is not self.planner.last_hold:
                log.info("planner: hold (%s)", decision.value)
                self.planner.last_hold = decision
            return decision
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
        self.moves[(decision.old.value, decision.new.value, decision.reason.value)] += len(decision.workers)
        # every worker of the move changes together: their drains overlap instead of adding up
        await asyncio.gather(
            *(
                self.core.roles.change(name, decision.new, reason=decision.reason.value, detail=decision.detail)
                for name in decision.workers
            )
        )
        return decision
