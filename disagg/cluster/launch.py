"""Start a set of engine workers on Ray (embedded local cluster by default, or an existing one by address)
and connect every decode worker to every prefill worker's KV cache."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from disagg.cluster.actors import AggregatedWorker, DecodeWorker, PrefillWorker
from disagg.cluster.client import DisaggClient


@dataclass
class ClusterConfig:
    num_prefill: int = 1  # 0: aggregated workers (each prefills and decodes)
    num_decode: int = 1
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields for every worker
    address: str | None = None  # None: start an embedded local Ray cluster
    transfer_timeout_s: float = 10.0


class LocalCluster:
    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = config = config or ClusterConfig()
        if config.num_decode <= 0:
            raise ValueError("num_decode must be >= 1")
        if not ray.is_initialized():
            ray.init(address=config.address, include_dashboard=False, log_to_driver=True)
        tag = uuid.uuid4().hex[:6]
        decode_cls = DecodeWorker if config.num_prefill else AggregatedWorker
        self.prefill = [PrefillWorker.remote(f"prefill-{i}-{tag}", config.engine, config.transfer_timeout_s)
                        for i in range(config.num_prefill)]
        self.decode = [decode_cls.remote(f"decode-{i}-{tag}", config.engine, config.transfer_timeout_s)
                       for i in range(config.num_decode)]
        ray.get([w.ready.remote() for w in self.workers])
        self.connect()
        self.client = DisaggClient(self.prefill, self.decode)

    @property
    def workers(self) -> list[Any]:
        return self.prefill + self.decode

    def connect(self) -> None:
        """Exchange KV layouts (NIXL agent metadata) once per (decode, prefill) pair."""
        layouts = ray.get([p.layout.remote() for p in self.prefill])
        ray.get([d.add_peer.remote(layout) for d in self.decode for layout in layouts])

    def stats(self) -> list[dict[str, Any]]:
        return ray.get([w.stats.remote() for w in self.workers])

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.prefill, self.decode = [], []
