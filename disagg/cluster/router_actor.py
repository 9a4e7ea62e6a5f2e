"""The router's Ray actor: hosts the router service (cluster/router_service.py: routing core, planner, HTTP
front door); it follows the workers' KV events (router/event_follow.py).

Lifecycle: Ray restarts it (max_restarts, see launch.py) with the same constructor arguments - small, inline, the
workers looked up by name - and the service binds the same port again.  `stop()` ends the HTTP server.

Kept apart from the engine workers' actors (cluster/actors.py): Ray imports this module in the router's process,
which must load no torch and no triton (tests/test_router_imports.py).
"""

from __future__ import annotations

import os
from typing import Any

import ray

from disagg.cluster.handles import RayWorkerHandle
from disagg.cluster.model_loader import RayModelLoader, alive, encoder_ports
from disagg.cluster.router_service import RouterConfig, RouterService
from disagg.cluster.runtime_table import GcsTableStore


@ray.remote(num_cpus=0, max_concurrency=8, max_task_retries=0)  # type: ignore[call-overload]  # ray's stubs
class RouterActor:
    """Hosts the router core and the OpenAI-compatible HTTP server."""

    def __init__(self, config: bytes, prefill: list[str], decode: list[str]) -> None:
        """`config`: a RouterConfig message.  Workers are named actors, looked up by name: the constructor's
        arguments stay small and inline, so Ray can always restart the router with them."""
        node = ray.get_runtime_context().get_node_id()
        settings = RouterConfig.from_wire(config)
        template = settings.worker_template
        store = GcsTableStore(settings.runtime_key) if settings.runtime_key else None
        self.service = RouterService(
            settings,
            {n: RayWorkerHandle(n, actor, node) for n, actor in alive(prefill).items()},
            {n: RayWorkerHandle(n, actor, node) for n, actor in alive(decode).items()},
            encoders=encoder_ports(alive(settings.encoders)),
            loader=RayModelLoader(settings, template, store) if template is not None else None,  # /admin/models
        )
        self.url = self.service.start()

    def get_url(self) -> str:
        return self.url

    def pid(self) -> int:
        return os.getpid()

    def decisions(self, n: int = 100) -> list[dict[str, Any]]:
        return self.service.core.recent_decisions(n)

    def health(self) -> dict[str, Any]:
        core = self.service.core
        return {
            "workers": {
                n: {"state": w.state.value, "reason": w.reason, "incarnation": w.incarnation, "restarts": w.restarts}
                for n, w in core.health.workers.items()
            },
            "events": core.health.recent_events(200),
            "counters": core.counters.to_wire(),  # a RouterCounters message
            # the silent-failure watch (router/watch.py): canaries judged, workers condemned, drains; None: off
            "silent": None
            if core.watch is None
            else {**vars(core.watch.counts), "reference": core.watch.book.reference},
            "loads": {
                n: {
                    "active_requests": load.active_requests,
                    "active_blocks": load.active_blocks,
                    "queued_prefill_tokens": load.queued_prefill_tokens,
                }
                for n, load in core.loads.items()
            },
        }

    def index_size(self) -> dict[str, int]:
        counts = self.service.core.index.block_counts()  # one scan of the index for every worker
        return {name: counts.get(name, 0) for name in self.service.core.loads}

    def stop(self) -> None:
        self.service.stop()
