"""Prometheus metrics served by the router's /metrics (names follow vLLM habits, prefixed `disagg:`).

Two kinds:
  * the HTTP front end's own: requests, tokens, TTFT/ITL/E2E histograms, prefix-cache counters, routing;
  * the cluster's, collected at scrape time (no extra polling) from a typed `ClusterSnapshot` the router side
    hands in (router/metrics_view.py builds it from the router core): the core's `RouterCounters` (migrations,
    fallbacks, requests by path, role changes), every worker's `WorkerStats` from its latest heartbeat, labelled
    by worker (`disagg:worker_<field>{worker, detail}`: a map field's key is `detail`, "" for a plain figure),
    each worker's health state and restart count, the admission queue and the planner's decisions.
This module knows the snapshot types only (disagg/protocol.py and the views below), never the router core.
Aggregating worker figures in the router (instead of Ray's metrics export) keeps one scrape target that works
the same under `disagg serve`, `ray job submit` and KubeRay, and needs no Ray metrics agent.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from disagg.errors import Rejection
from disagg.isolation import tenant_label
from disagg.planner.fleet_loop import FleetLoop
from disagg.planner.policy import Hold, Reason
from disagg.protocol import Role, WorkerState
from disagg.stats import PREDICTION_ERROR_BOUNDS, RouterCounters, StatKind, WorkerStats, stat_kind

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RoutedTo(Protocol):
    """What /metrics reads of the router's `Decision` (router/policy.py): this module cannot import the router,
    which imports it (router/metrics_view.py), so the decision is typed by the fields it uses."""

    decode_worker: str
    prefill_worker: str | None
    peer_worker: str | None
    flexible: bool


@dataclass
class WorkerView:
    name: str
    role: Role
    state: WorkerState
    restarts: int
    stats: WorkerStats | None  # None until its first measured heartbeat
    ttft_correction: float = 1.0  # how far its TTFTs ran from the placement model's predictions (router/correction.py)


@dataclass
class QueueView:
    """The router's admission queue."""

    depth: Mapping[tuple[int, str], int]  # (priority, tenant) -> requests waiting
    queued_tokens: int
    rejected: Mapping[Rejection, int]  # refusal reason -> count
    served_tokens: Mapping[str, float]  # tenant -> tokens


@dataclass
class PlannerView:
    enabled: bool
    moves: Mapping[tuple[Role, Role, Reason], int]  # (from, to, reason) -> workers moved
    holds: Mapping[Hold, int]  # hold reason -> rounds


@dataclass
class PauseView:  # the router's event loop not running (router/health.py): heartbeats unread, yet no worker silent
    count: int
    seconds: float


@dataclass
class ClusterSnapshot:
    counters: RouterCounters
    workers: list[WorkerView]
    queue: QueueView
    planner: PlannerView | None  # None: no planner in this service
    pauses: PauseView | None = None  # the health supervisor's local pauses (None: no supervisor)


class ClusterCollector:
    """The cluster's figures, read from a fresh snapshot each time /metrics is scraped."""

    def __init__(self, snapshot: Callable[[], ClusterSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from _families(self.snapshot())


class ModelsCollector:
    """Several models' cluster figures (a multi-model deployment: one routing core per model) as one set of
    families, each sample labelled with its `model`; one model's as ClusterCollector gives them."""

    def __init__(self, snapshots: Callable[[], Mapping[str, ClusterSnapshot]]) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        snapshots = self.snapshots()
        if len(snapshots) == 1:  # one model (so far): the single-model families, unlabelled
            yield from _families(next(iter(snapshots.values())))
            return
        merged: dict[str, Metric] = {}
        for model, snap in snapshots.items():
            for family in _families(snap):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                out.samples.extend(s._replace(labels={**s.labels, "model": model}) for s in family.samples)
        yield from merged.values()


class FleetCollector:
    """The fleet planner's moves between models and holds, and each model's awake and parked workers as of its last
    round (planner/fleet_loop.py)."""

    def __init__(self, fleet: FleetLoop) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        f = self.fleet
        moves = CounterMetricFamily(
            "disagg:fleet_moves",
            "Workers the fleet planner moved between models",
            labels=["donor", "recipient", "reason"],
        )
        for (donor, recipient, reason), n in sorted(f.moves.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            moves.add_metric([donor, recipient, reason.value], n)
        holds = CounterMetricFamily(
            "disagg:fleet_holds", "Fleet planner rounds without a move, by reason", labels=["reason"]
        )
        for hold, n in sorted(f.holds.items(), key=lambda kv: kv[0].value):
            holds.add_metric([hold.value], n)
        workers = GaugeMetricFamily(
            "disagg:fleet_workers", "Workers per model, awake or parked", labels=["model", "state"]
        )
        for m in f.last.models if f.last is not None else []:
            workers.add_metric([m.model, "awake"], len(m.awake_decoders()))
            workers.add_metric([m.model, "parked"], sum(w.parked for w in m.workers))
        yield from (moves, holds, workers)


def _families(snap: ClusterSnapshot) -> Iterator[Metric]:
    yield from router_metrics(snap.counters)
    yield from planner_metrics(snap.counters, snap.planner)
    yield from worker_metrics(snap.workers)
    yield from queue_metrics(snap.queue)
    if snap.pauses is not None:
        yield _counter(
            "disagg:router_pauses", "Router event-loop pauses that left heartbeats unread", snap.pauses.count
        )
        yield _counter("disagg:router_paused_seconds", "Total length of the router's pauses", snap.pauses.seconds)


_E = TypeVar("_E", bound=enum.Enum)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text)
    family.add_metric([], value)
    return family


def _by_enum(name: str, text: str, label: str, counts: Mapping[_E, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=[label])
    for key, n in sorted(counts.items(), key=lambda item: item[0].value):
        family.add_metric([key.value], n)
    return family


def router_metrics(counters: RouterCounters) -> Iterator[Metric]:
    yield _counter("disagg:migrations", "Requests moved to another worker mid-stream", counters.migrations)
    yield _by_enum(
        "disagg:requests_by_path",
        "Served requests by how their prefill ran (disaggregated, local, peer_prefix, fallback, migrated)",
        "path",
        counters.paths,
    )
    yield _by_enum(
        "disagg:fallbacks",
        "Remote prefill / peer prefix failures that fell back to computing on the decode worker",
        "kind",
        counters.fallbacks,
    )
    yield _by_enum(
        "disagg:placements",
        "Routing decisions by what priced their prefill placement: the workers' measured step times, or the prior",
        "priced_from",
        counters.placements,
    )
    yield _counter(
        "disagg:ttft_predictions",
        "Finished requests whose routing decision predicted their time to first token",
        counters.ttft_predictions,
    )
    yield _counter(
        "disagg:ttft_prediction_error",
        "Sum of |predicted - actual| / actual time to first token (from routing); divide by disagg:ttft_predictions",
        counters.ttft_prediction_error,
    )
    within = zip(PREDICTION_ERROR_BOUNDS, counters.ttft_prediction_error_within, strict=True)
    yield HistogramMetricFamily(
        "disagg:ttft_prediction_relative_error",
        "|predicted - actual| / actual time to first token of the routing decisions' predictions",
        buckets=[*((f"{bound:g}", count) for bound, count in within), ("+Inf", counters.ttft_predictions)],
        sum_value=counters.ttft_prediction_error,
    )


def worker_metrics(workers: list[WorkerView]) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "disagg:worker_state", "1 for the state each worker is in", labels=["worker", "role", "state"]
    )
    restarts = CounterMetricFamily("disagg:worker_restarts", "Worker restarts seen by the router", labels=["worker"])
    correction = GaugeMetricFamily(
        "disagg:worker_ttft_correction",
        "The factor the router scales a worker's predicted time to first token by, learned from its outcomes "
        "(actual / predicted; 1: none)",
        labels=["worker"],
    )
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for w in workers:
        state.add_metric([w.name, w.role.value, w.state.value], 1)
        restarts.add_metric([w.name], w.restarts)
        correction.add_metric([w.name], w.ttft_correction)
        if w.stats is not None:
            _add_worker_stats(families, w.name, w.stats)
    yield state
    yield restarts
    yield correction
    yield from families.values()


def _add_worker_stats(
    families: dict[str, CounterMetricFamily | GaugeMetricFamily], worker: str, stats: WorkerStats
) -> None:
    """One family per WorkerStats field (`disagg:worker_<field>`); a map's keys are the `detail` label, a plain
    figure has detail "", a figure the worker does not have (None: no tiers, no disk) is left out."""
    for f in dataclasses.fields(stats):
        value = getattr(stats, f.name)
        if value is None:
            continue
        items = value.items() if isinstance(value, dict) else [("", value)]
        for key, v in items:
            family = families.get(f.name)
            if family is None:
                cls = CounterMetricFamily if stat_kind(f) is StatKind.COUNTER else GaugeMetricFamily
                family = families[f.name] = cls(
                    f"disagg:worker_{f.name}", f"Worker figure '{f.name}' from heartbeats", labels=["worker", "detail"]
                )
            family.add_metric([worker, key.value if isinstance(key, enum.Enum) else key], v)


def queue_metrics(queue: QueueView) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "disagg:queue_depth", "Requests waiting in the router's admission queue", labels=["priority", "tenant"]
    )
    for (priority, tenant), n in sorted(queue.depth.items()):
        depth.add_metric([str(priority), tenant_label(tenant)], n)  # hashed: a scrape does not name customers
    yield depth
    tokens = GaugeMetricFamily("disagg:queue_tokens", "Prompt tokens waiting in the admission queue")
    tokens.add_metric([], queue.queued_tokens)
    yield tokens
    rejected = CounterMetricFamily(
        "disagg:rejected_requests", "Requests refused with 429, by reason", labels=["reason"]
    )
    for reason, n in queue.rejected.items():
        rejected.add_metric([reason.value], n)
    yield rejected
    served = CounterMetricFamily(
        "disagg:tenant_served_tokens", "Prompt + generated tokens served per tenant", labels=["tenant"]
    )
    for tenant, tokens_served in sorted(queue.served_tokens.items()):
        served.add_metric([tenant_label(tenant)], tokens_served)
    yield served


class RouterMetrics:
    """The front end's metrics, plus the cluster's when given a snapshot source (the router's composition root
    passes `cluster_snapshot` of its core: router/metrics_view.py)."""

    def __init__(
        self,
        cluster: Callable[[], ClusterSnapshot] | None = None,
        *,
        models: Callable[[], Mapping[str, ClusterSnapshot]] | None = None,
    ) -> None:
        """`cluster`: one routing core's figures; `models`: several models' (labelled by model) instead."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "disagg:requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        model = ["model"]  # the served model (its id; an adapter's name), as vLLM's model_name label
        self.prompt_tokens = Counter("disagg:prompt_tokens", "Prompt tokens of admitted requests", model, registry=r)
        self.generation_tokens = Counter("disagg:generation_tokens", "Generated tokens", model, registry=r)
        self.prefix_cache_queries = Counter(
            "disagg:prefix_cache_queries",
            "Prompt tokens looked up in the serving worker's prefix cache",
            model,
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "disagg:prefix_cache_hits",
            "Prompt tokens not computed for the request (device prefix cache, CPU/disk tier, or a peer's KV)",
            model,
            registry=r,
        )
        self.routed = Counter("disagg:routed_requests", "Routing decisions", ["decode_worker", "mode"], registry=r)
        self.running = Gauge("disagg:num_requests_running", "Requests in flight", model, registry=r)
        self.ttft = Histogram("disagg:time_to_first_token_seconds", "TTFT", model, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(
            "disagg:e2e_request_latency_seconds", "End-to-end latency", model, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "disagg:inter_token_latency_seconds",
            "Gaps between streamed tokens",
            model,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.idle_sleeps = Counter(
            "disagg:model_idle_sleeps",
            "Models put to sleep for want of requests (--sleep-after-idle-s)",
            model,
            registry=r,
        )
        self.request_wakes = Counter(
            "disagg:model_request_wakes", "Asleep models woken by a request", model, registry=r
        )
        self.staleness = Histogram(
            "disagg:route_staleness_tokens",
            "Prompt tokens the router expected the "
            "computing worker to find cached minus what it found (>0: the index was stale "
            "or optimistic, <0: it under-reported)",
            buckets=(-1024, -256, -64, -16, -1, 0, 16, 64, 256, 1024, 4096),
            registry=r,
        )
        self.queue_wait = Histogram(
            "disagg:queue_wait_seconds",
            "Time requests waited in the admission queue",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.images = Counter(
            "disagg:images",
            "Images of requests, by where they were encoded (encoder: an encoder worker; colocated: the prefill "
            "worker, by the rule; fallback: the prefill worker, an encoder having failed)",
            ["encoded"],
            registry=r,
        )
        self.ignored_hints = Counter(
            "disagg:ignored_hints",
            "Agent hints (nvext, kv_hints) accepted but not used, by hint name (unknown names: 'other')",
            ["hint"],
            registry=r,
        )
        if cluster is not None:
            r.register(ClusterCollector(cluster))
        elif models is not None:
            r.register(ModelsCollector(models))

    def on_route(self, decision: RoutedTo) -> None:
        mode = "disaggregated" if decision.prefill_worker else ("peer_prefix" if decision.peer_worker else "local")
        mode = "flexible" if decision.flexible else mode  # a prefill worker serving the request whole
        self.routed.labels(decision.decode_worker, mode).inc()


def planner_metrics(counters: RouterCounters, planner: PlannerView | None) -> Iterator[Metric]:
    """Role changes (manual or planned) and the planner's decisions with their reasons."""
    changes = CounterMetricFamily(
        "disagg:role_changes", "Workers moved between roles at runtime", labels=["from", "to"]
    )
    for old, to in sorted(counters.role_changes.items()):
        for new, n in sorted(to.items()):
            changes.add_metric([old.value, new.value], n)
    yield changes
    enabled = GaugeMetricFamily("disagg:planner_enabled", "1 when the planner loop runs")
    enabled.add_metric([], 1.0 if planner is not None and planner.enabled else 0.0)
    yield enabled
    moves = CounterMetricFamily(
        "disagg:planner_moves", "Role changes the planner made", labels=["from", "to", "reason"]
    )
    holds = CounterMetricFamily("disagg:planner_holds", "Planner rounds without a move, by reason", labels=["reason"])
    if planner is not None:
        for (source, target, reason), n in sorted(planner.moves.items(), key=lambda kv: [k.value for k in kv[0]]):
            moves.add_metric([source.value, target.value, reason.value], n)
        for hold, n in sorted(planner.holds.items(), key=lambda kv: kv[0].value):
            holds.add_metric([hold.value], n)
    yield moves
    yield holds
