"""Ray actor classes: one engine worker per actor, its role fixed by the class."""
from __future__ import annotations

from typing import Any

import ray

from disagg.cluster.worker import EngineWorker, WorkerConfig
from disagg.protocol import KVEventBatch
from disagg.router.server import RouterConfig, RouterServer


class _RoleWorker(EngineWorker):
    ROLE = "both"

    def __init__(self, name: str, engine: dict[str, Any], transfer_timeout_s: float = 10.0) -> None:
        super().__init__(WorkerConfig(name=name, role=self.ROLE, engine=engine,
                                      transfer_timeout_s=transfer_timeout_s))


# num_cpus=0: the engines size their own torch thread pools; Ray's CPU accounting would only serialize them.
@ray.remote(num_cpus=0)
class PrefillWorker(_RoleWorker):
    ROLE = "prefill"


@ray.remote(num_cpus=0)
class DecodeWorker(_RoleWorker):
    ROLE = "decode"


@ray.remote(num_cpus=0)
class AggregatedWorker(_RoleWorker):
    ROLE = "both"


@ray.remote(num_cpus=0, max_concurrency=8)
class RouterActor:
    """Hosts the router core and the OpenAI-compatible HTTP server; workers publish KV events to it."""

    def __init__(self, config: dict[str, Any], prefill: dict[str, Any], decode: dict[str, Any]) -> None:
        self._workers = {**prefill, **decode}
        self.server = RouterServer(RouterConfig(**config), prefill, decode, self._request_snapshot)
        self.url = self.server.start()

    def _request_snapshot(self, worker: str) -> None:
        # Runs on the actor's thread pool; the reply is applied when it arrives.
        batch = ray.get(self._workers[worker].kv_snapshot.remote(), timeout=30)
        self.server.core.on_kv_events(KVEventBatch.from_wire(batch))

    def get_url(self) -> str:
        return self.url

    def publish_kv_events(self, batch: bytes) -> bool:
        return self.server.publish_kv_events(batch)

    def decisions(self, n: int = 100) -> list[dict[str, Any]]:
        return self.server.core.recent_decisions(n)

    def index_size(self) -> dict[str, int]:
        core = self.server.core
        return {name: len(core.index.blocks_of(name)) for name in core.loads}

    def stop(self) -> None:
        self.server.stop()
