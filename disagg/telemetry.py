"""Prometheus metrics for the router's HTTP front end (names follow vLLM habits, prefixed `disagg:`)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("disagg:requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("disagg:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("disagg:generation_tokens", "Generated tokens", registry=r)
        self.prefix_cache_queries = Counter("disagg:prefix_cache_queries", "Prompt tokens looked up in the "
                                            "serving worker's prefix cache", registry=r)
        self.prefix_cache_hits = Counter("disagg:prefix_cache_hits", "Prompt tokens found in the serving "
                                         "worker's prefix cache", registry=r)
        self.routed = Counter("disagg:routed_requests", "Routing decisions", ["decode_worker", "mode"], registry=r)
        self.running = Gauge("disagg:num_requests_running", "Requests in flight", registry=r)
        self.ttft = Histogram("disagg:time_to_first_token_seconds", "TTFT", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("disagg:e2e_request_latency_seconds", "End-to-end latency", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.itl = Histogram("disagg:inter_token_latency_seconds", "Gaps between streamed tokens",
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
