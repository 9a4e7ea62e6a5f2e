"""Ray actor classes: one engine worker per actor (its role fixed by the class, so `ps` shows
`ray::PrefillWorker` / `ray::DecodeWorker`), and the router actor hosting the HTTP endpoint.

Restarts are Ray's: every actor is created with max_restarts (see launch.py) and max_task_retries=0, so a call
in flight when a process dies fails at once (the router migrates the request) and Ray brings the actor back
with the same constructor arguments - a worker as a new incarnation that the router's supervisor wires back in,
the router on the same port.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from disagg.cluster.handles import RayWorkerHandle
from disagg.cluster.worker import EngineWorker, WorkerConfig
from disagg.protocol import Role
from disagg.router.server import RouterConfig, RouterServer


class _RoleWorker(EngineWorker):
    ROLE = Role.BOTH

    def __init__(self, name: str, engine: dict[str, Any], **options: Any) -> None:
        super().__init__(WorkerConfig(name=name, role=self.ROLE, engine=engine, **options))
        self.node_id = ray.get_runtime_context().get_node_id()


# num_cpus=0: the engines size their own torch thread pools; Ray's CPU accounting would only serialize them.
@ray.remote(num_cpus=0, max_task_retries=0)
class PrefillWorker(_RoleWorker):
    ROLE = Role.PREFILL


@ray.remote(num_cpus=0, max_task_retries=0)
class DecodeWorker(_RoleWorker):
    ROLE = Role.DECODE


@ray.remote(num_cpus=0, max_task_retries=0)
class AggregatedWorker(_RoleWorker):
    ROLE = Role.BOTH


@ray.remote(num_cpus=0, max_concurrency=8, max_task_retries=0)  # type: ignore[call-overload]  # ray's stubs
class RouterActor:
    """Hosts the router core and the OpenAI-compatible HTTP server; workers publish KV events to it."""

    def __init__(self, config: dict[str, Any], prefill: list[str], decode: list[str]) -> None:
        """Workers are named actors, looked up by name: the constructor's arguments stay small and inline, so
        Ray can always restart the router with them."""
        node = ray.get_runtime_context().get_node_id()
        self.server = RouterServer(
            RouterConfig(**config),
            {n: RayWorkerHandle(n, ray.get_actor(n), node) for n in prefill},
            {n: RayWorkerHandle(n, ray.get_actor(n), node) for n in decode},
        )
        self.url = self.server.start()

    def get_url(self) -> str:
        return self.url

    def pid(self) -> int:
        return os.getpid()

    def publish_kv_events(self, batch: bytes) -> bool:
        return self.server.publish_kv_events(batch)

    def decisions(self, n: int = 100) -> list[dict[str, Any]]:
        return self.server.core.recent_decisions(n)

    def health(self) -> dict[str, Any]:
        core = self.server.core
        return {
            "workers": {
                n: {"state": w.state.value, "reason": w.reason, "incarnation": w.incarnation, "restarts": w.restarts}
                for n, w in core.health.workers.items()
            },
            "events": core.health.recent_events(200),
            "counters": core.counters.to_wire(),  # a RouterCounters message
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
        core = self.server.core
        return {name: len(core.index.blocks_of(name)) for name in core.loads}

    def stop(self) -> None:
        self.server.stop()
