"""The router core as /metrics sees it: a typed `ClusterSnapshot` (disagg/telemetry.py) taken at scrape time.

Telemetry is a ground-floor module and knows nothing of the router; the composition root hands it
`lambda: cluster_snapshot(core)` (http/app.py), so the dependency points from the router to telemetry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from disagg.telemetry import ClusterSnapshot, PauseView, PlannerView, QueueView, WorkerView

if TYPE_CHECKING:
    from disagg.router.router import RouterCore


def cluster_snapshot(core: RouterCore) -> ClusterSnapshot:
    factor = core.policy.correction.factor
    workers = [
        WorkerView(w.name, w.role, w.state, w.restarts, w.stats, factor(w.name)) for w in core.health.workers.values()
    ]
    queue = core.admission.queue
    queue_view = QueueView(queue.depth(), queue.queued_tokens, dict(queue.rejected), dict(queue.served_tokens))
    planner = core.planner
    planner_view = (
        PlannerView(planner.config.enabled, dict(planner.moves), dict(planner.holds)) if planner is not None else None
    )
    pauses = PauseView(core.health.pause.count, core.health.pause.seconds) if core.supervisor is not None else None
    return ClusterSnapshot(core.counters, workers, queue_view, planner_view, pauses)
