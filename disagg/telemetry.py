"""Prometheus metrics served by the router's /metrics (names follow vLLM habits, prefixed `disagg:`).

Two kinds:
  * the HTTP front end's own: requests, tokens, TTFT/ITL/E2E histograms, prefix-cache counters, routing;
  * the cluster's, collected at scrape time (no extra polling): the router core's counters (migrations,
    fallbacks, requests by path) and every worker's figures from its latest heartbeat, labelled by worker
    (KV blocks, running/waiting, preemptions, steps, transfer bytes and failures, per-tier hits, bytes, load
    times, checksum failures, pins) plus each worker's health state and restart count.
Aggregating worker figures in the router (instead of Ray's metrics export) keeps one scrape target that works
the same under `disagg serve`, `ray job submit` and KubeRay, and needs no Ray metrics agent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SAFE = re.compile(r"[^a-zA-Z0-9_]")


class ClusterCollector:
    """Router core counters and worker heartbeat figures, read when /metrics is scraped."""

    def __init__(self, core: Any) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        core = self.core
        migrations = CounterMetricFamily("disagg:migrations", "Requests moved to another worker mid-stream")
        migrations.add_metric([], core.counters.get("migrations", 0))
        yield migrations
        paths = CounterMetricFamily(
            "disagg:requests_by_path",
            "Served requests by how their prefill ran (disaggregated, local, peer_prefix, fallback, migrated)",
            labels=["path"],
        )
        fallbacks = CounterMetricFamily(
            "disagg:fallbacks",
            "Remote prefill / peer prefix failures that fell back to computing on the decode worker",
            labels=["kind"],
        )
        for key, value in sorted(core.counters.items()):
            if key.startswith("path:"):
                paths.add_metric([key[5:]], value)
            elif key.startswith("fallback:"):
                fallbacks.add_metric([key[9:]], value)
        yield paths
        yield fallbacks
        yield from _planner_metrics(core)
        state = GaugeMetricFamily(
            "disagg:worker_state", "1 for the state each worker is in", labels=["worker", "role", "state"]
        )
        restarts = CounterMetricFamily(
            "disagg:worker_restarts", "Worker restarts seen by the router", labels=["worker"]
        )
        gauges: dict[str, GaugeMetricFamily] = {}
        counters: dict[str, CounterMetricFamily] = {}
        for name, w in core.health.workers.items():
            state.add_metric([name, w.role.value, w.state.value], 1)
            restarts.add_metric([name], w.restarts)
            hb = w.heartbeat
            if hb is None:
                continue
            for key, value in hb.gauges.items():
                self._add(gauges, GaugeMetricFamily, key, name, value)
            for key, value in hb.counters.items():
                self._add(counters, CounterMetricFamily, key, name, value)
        yield state
        yield restarts
        yield from gauges.values()
        yield from counters.values()
        yield from self._admission()

    def _admission(self) -> Iterator[Metric]:
        queue = self.core.admission.queue
        depth = GaugeMetricFamily(
            "disagg:queue_depth", "Requests waiting in the router's admission queue", labels=["priority", "tenant"]
        )
        for (priority, tenant), n in sorted(queue.depth().items()):
            depth.add_metric([str(priority), tenant], n)
        yield depth
        tokens = GaugeMetricFamily("disagg:queue_tokens", "Prompt tokens waiting in the admission queue")
        tokens.add_metric([], queue.queued_tokens)
        yield tokens
        rejected = CounterMetricFamily(
            "disagg:rejected_requests", "Requests refused with 429, by reason", labels=["reason"]
        )
        for reason, n in queue.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        served = CounterMetricFamily(
            "disagg:tenant_served_tokens", "Prompt + generated tokens served per tenant", labels=["tenant"]
        )
        for tenant, n in sorted(queue.served_tokens.items()):
            served.add_metric([tenant], n)
        yield served

    @staticmethod
    def _add(families: dict, cls: type, key: str, worker: str, value: float) -> None:
        base, _, label = key.partition(":")
        metric = f"disagg:worker_{_SAFE.sub('_', base)}"
        family = families.get(metric)
        if family is None:
            family = families[metric] = cls(
                metric, f"Worker figure '{base}' from heartbeats", labels=["worker", "detail"]
            )
        family.add_metric([worker, label], value)


class RouterMetrics:
    def __init__(self, core: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "disagg:requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("disagg:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("disagg:generation_tokens", "Generated tokens", registry=r)
        self.prefix_cache_queries = Counter(
            "disagg:prefix_cache_queries", "Prompt tokens looked up in the serving worker's prefix cache", registry=r
        )
        self.prefix_cache_hits = Counter(
            "disagg:prefix_cache_hits",
            "Prompt tokens not computed for the request (device prefix cache, CPU/disk tier, or a peer's KV)",
            registry=r,
        )
        self.routed = Counter("disagg:routed_requests", "Routing decisions", ["decode_worker", "mode"], registry=r)
        self.running = Gauge("disagg:num_requests_running", "Requests in flight", registry=r)
        self.ttft = Histogram("disagg:time_to_first_token_seconds", "TTFT", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(
            "disagg:e2e_request_latency_seconds", "End-to-end latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "disagg:inter_token_latency_seconds",
            "Gaps between streamed tokens",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
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
        if core is not None:
            r.register(ClusterCollector(core))

    def on_route(self, decision: Any) -> None:
        mode = "disaggregated" if decision.prefill_worker else ("peer_prefix" if decision.peer_worker else "local")
        self.routed.labels(decision.decode_worker, mode).inc()


def _planner_metrics(core: Any) -> Iterator[Metric]:
    """Role changes (manual or planned) and the planner's decisions with their reasons."""
    changes = CounterMetricFamily(
        "disagg:role_changes", "Workers moved between roles at runtime", labels=["from", "to"]
    )
    for key, value in sorted(core.counters.items()):
        if key.startswith("role_change:"):
            old, _, new = key[len("role_change:") :].partition("->")
            changes.add_metric([old, new], value)
    yield changes
    planner = getattr(core, "planner", None)
    enabled = GaugeMetricFamily("disagg:planner_enabled", "1 when the planner loop runs")
    enabled.add_metric([], 1.0 if planner is not None and planner.config.enabled else 0.0)
    yield enabled
    moves = CounterMetricFamily(
        "disagg:planner_moves", "Role changes the planner made", labels=["from", "to", "reason"]
    )
    holds = CounterMetricFamily("disagg:planner_holds", "Planner rounds without a move, by reason", labels=["reason"])
    if planner is not None:
        for (old, new, reason), n in sorted(planner.moves.items()):
            moves.add_metric([old, new, reason], n)
        for reason, n in sorted(planner.holds.items()):
            holds.add_metric([reason], n)
    yield moves
    yield holds
