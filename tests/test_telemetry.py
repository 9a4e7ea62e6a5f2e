"""/metrics from a typed ClusterSnapshot: the admission queue's refusals and the planner's moves and holds are kept
by their enums and exported by the enums' values; a routing decision is counted by its mode."""
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from disagg.errors import Rejection
from disagg.planner.policy import Hold, Reason
from disagg.protocol import Role, WorkerState
from disagg.router.admission import AdmissionQueue
from disagg.router.decision import Decision
from disagg.stats import RouterCounters
from disagg.telemetry import ClusterSnapshot, PauseView, PlannerView, QueueView, RouterMetrics, WorkerView


def _samples(metrics: RouterMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_refusals_moves_and_holds_are_kept_by_enum_and_exported_by_value():
    queue = AdmissionQueue()
    assert set(queue.rejected) == set(Rejection) and all(type(k) is Rejection for k in queue.rejected)
    rejected = {**queue.rejected, Rejection.SHED: 2}
    moves = {(Role.BOTH, Role.PREFILL, Reason.PREFILL_BACKLOG): 3}
    snapshot = ClusterSnapshot(RouterCounters(), [], QueueView({}, 0, rejected, {}),
                               PlannerView(True, moves, {Hold.COOLDOWN: 4}))
    samples = _samples(RouterMetrics(lambda: snapshot))
    assert samples[("disagg:rejected_requests_total", (("reason", "shed"),))] == 2
    assert samples[("disagg:rejected_requests_total", (("reason", "queue_full"),))] == 0
    labels = (("from", "both"), ("reason", "prefill_backlog"), ("to", "prefill"))
    assert samples[("disagg:planner_moves_total", labels)] == 3
    assert samples[("disagg:planner_holds_total", (("reason", "cooldown"),))] == 4


def test_a_routing_decision_is_counted_by_its_mode():
    metrics = RouterMetrics()
    metrics.on_route(Decision("d0", "p0", 0))
    metrics.on_route(Decision("d0", None, 0, peer_worker="d1"))
    metrics.on_route(Decision("d1", None, 0))
    samples = _samples(metrics)
    for worker, mode in [("d0", "disaggregated"), ("d0", "peer_prefix"), ("d1", "local")]:
        assert samples[("disagg:routed_requests_total", (("decode_worker", worker), ("mode", mode)))] == 1


def test_the_placements_prediction_errors_are_a_histogram_whose_02_bucket_reads_the_median_goal():
    """Cumulative buckets of |predicted - actual| / actual, +Inf = every prediction; the bucket at "0.2" is the one
    bench.scrape reads (median error <= 20% exactly when it holds at least half)."""
    counters = RouterCounters()
    for error in (0.01, 0.15, 0.2, 0.7, 9.0):
        counters.predicted(error)
    snapshot = ClusterSnapshot(counters, [], QueueView({}, 0, {}, {}), PlannerView(False, {}, {}))
    samples = _samples(RouterMetrics(lambda: snapshot))
    buckets = {dict(k[1])["le"]: v for k, v in samples.items() if k[0] == "disagg:ttft_prediction_relative_error_bucket"}
    assert buckets == {"0.05": 1, "0.1": 1, "0.2": 3, "0.5": 3, "1": 4, "2": 4, "5": 4, "+Inf": 5}
    assert samples[("disagg:ttft_prediction_relative_error_count", ())] == 5
    assert samples[("disagg:ttft_prediction_relative_error_sum", ())] == sum((0.01, 0.15, 0.2, 0.7, 9.0))
    assert RouterCounters.from_wire(counters.to_wire()) == counters  # the histogram travels with the counters


def test_each_worker_s_ttft_correction_is_a_gauge():
    workers = [WorkerView("d0", Role.DECODE, WorkerState.READY, 0, None, 1.3),
               WorkerView("p0", Role.PREFILL, WorkerState.READY, 0, None)]
    snapshot = ClusterSnapshot(RouterCounters(), workers, QueueView({}, 0, {}, {}), None)
    samples = _samples(RouterMetrics(lambda: snapshot))
    assert samples[("disagg:worker_ttft_correction", (("worker", "d0"),))] == 1.3
    assert samples[("disagg:worker_ttft_correction", (("worker", "p0"),))] == 1.0


def test_the_router_s_own_pauses_are_counters_only_where_a_supervisor_watches():
    queue = QueueView({}, 0, {}, {})
    samples = _samples(RouterMetrics(lambda: ClusterSnapshot(RouterCounters(), [], queue, None, PauseView(2, 3.5))))
    assert samples[("disagg:router_pauses_total", ())] == 2
    assert samples[("disagg:router_paused_seconds_total", ())] == 3.5
    bare = _samples(RouterMetrics(lambda: ClusterSnapshot(RouterCounters(), [], queue, None)))
    assert not any(name.startswith("disagg:router_pause") for name, _ in bare)
