"""Ray actor classes: one engine worker per actor, its role fixed by the class."""
from __future__ import annotations

from typing import Any

import ray

from disagg.cluster.worker import EngineWorker, WorkerConfig


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
