"""Start the serving system on Ray: engine workers, the router actor with its HTTP endpoint, and the wiring
(KV layouts exchanged once per decode/prefill pair; the router follows the workers' KV events).

`disagg serve`'s command line is disagg/cluster/serve_cli.py; this module is also run by
`ray job submit -- python -m disagg.cluster.launch ...` (inside a Ray job, `ray.init()` joins the job's cluster
through RAY_ADDRESS).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray._private import ray_constants  # the one knob that keeps a local cluster on loopback (init_ray)

from disagg.cluster.actors import AggregatedWorker, DecodeWorker, PrefillWorker
from disagg.cluster.client import DisaggClient
from disagg.cluster.router_actor import RouterActor
from disagg.cluster.router_service import ModelRoute, RouterConfig
from disagg.cluster.worker_config import MockConfig, WorkerConfig, worker_tiers
from disagg.config import EngineConfig
from disagg.http.server import free_port
from disagg.kv.tier_config import TierConfig
from disagg.models.deployment import Deployment, ModelSpec
from disagg.protocol import Role
from disagg.stats import WorkerStats
from disagg.tracing import TracingConfig
from disagg.transfer.config import TransportConfig


@dataclass
class ClusterConfig:
    num_prefill: int = field(
        default=1, metadata={"flag": "--prefill", "help": "prefill workers (0: aggregated workers)"}
    )
    num_decode: int = field(default=1, metadata={"flag": "--decode", "help": "decode (or aggregated) workers"})
    engine: EngineConfig = field(default_factory=EngineConfig)  # every worker's ("" model: the default model)
    # every worker's, each with its own disk directory under disk_root (worker_tiers); None: no CPU/disk tiers
    tiers: TierConfig | None = field(default_factory=TierConfig)
    # None: start an embedded local Ray cluster (or join RAY_ADDRESS)
    address: str | None = field(default=None, metadata={"help": "join an existing Ray cluster instead of starting one"})
    transfer_timeout_s: float = 10.0
    max_restarts: int = -1  # per worker actor (-1: always restart)
    transport_wrapper: str = ""  # WorkerConfig.transport_wrapper (the chaos benchmark's fault injector)
    allow_fault_injection: bool = False  # WorkerConfig's: drills only (bench chaos, tests), no `disagg serve` option
    tracing: TracingConfig | None = None  # the workers' spans (and the router's, via Service); None: none
    transport: TransportConfig = field(default_factory=TransportConfig)  # the workers' UCX devices
    # Ray custom resources each actor needs, to place roles on nodes that offer them (multi-node clusters,
    # KubeRay groups); empty: anywhere
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    router_resources: dict[str, float] = field(default_factory=dict)
    mock: MockConfig | None = None  # mock engines (cluster/mocker.py: no model, no KV tiers); None: the model

    def worker(self, name: str, role: Role, slot: str) -> WorkerConfig:
        """The config of the worker named `name` in position `slot` (its disk tier's directory)."""
        return WorkerConfig(
            name=name,
            role=role,
            engine=self.engine,
            tiers=worker_tiers(self.tiers, slot) if self.mock is None else None,
            transfer_timeout_s=self.transfer_timeout_s,
            transport_wrapper=self.transport_wrapper,
            allow_fault_injection=self.allow_fault_injection,
            tracing=self.tracing,
            transport=self.transport,
            mock=self.mock,
        )


def init_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS), or start a local cluster whose node IP is loopback."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, include_dashboard=False)
    else:
        # Ray maps 127.0.0.1 to the host's outward address (services.resolve_ip_for_localhost) unless its cluster
        # mode is off; a cluster started here is reached by no other host, so it stays on loopback
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")


class LocalCluster:
    def __init__(self, config: ClusterConfig | None = None, prefix: str = "") -> None:
        """`prefix`: what its workers' names and disk-tier directories start with (one model of a deployment)."""
        self.config = config = config or ClusterConfig()
        if config.num_decode <= 0 or config.num_prefill < 0:
            raise ValueError("need num_decode >= 1 and num_prefill >= 0")
        init_ray(config.address)
        if not config.engine.model:  # resolve once, so every worker and the router agree
            from disagg.model_store import default_model_dir

            config.engine = dataclasses.replace(config.engine, model=str(default_model_dir()))
        tag = uuid.uuid4().hex[:6]
        self.prefill_by_name: dict[str, Any] = {}
        self.decode_by_name: dict[str, Any] = {}
        for i in range(config.num_prefill):
            name = f"{prefix}prefill-{i}-{tag}"
            self.prefill_by_name[name] = PrefillWorker.options(  # type: ignore[attr-defined]  # added by @ray.remote
                name=name, max_restarts=config.max_restarts, resources=config.prefill_resources or None
            ).remote(config.worker(name, Role.PREFILL, f"{prefix}prefill-{i}").to_wire())
        decode_cls, role, kind = (
            (DecodeWorker, Role.DECODE, "decode") if config.num_prefill else (AggregatedWorker, Role.BOTH, "worker")
        )
        for i in range(config.num_decode):
            name = f"{prefix}decode-{i}-{tag}"
            self.decode_by_name[name] = decode_cls.options(  # type: ignore[union-attr]  # added by @ray.remote
                name=name, max_restarts=config.max_restarts, resources=config.decode_resources or None
            ).remote(config.worker(name, role, f"{prefix}{kind}-{i}").to_wire())
        ray.get([w.ready.remote() for w in self.workers])
        layouts = ray.get([w.layout.remote() for w in self.workers])
        ray.get([w.set_peers.remote(layouts) for w in self.workers])  # every worker can read every other
        self.client = DisaggClient(self.prefill_by_name, self.decode_by_name)

    @property
    def prefill(self) -> list[Any]:
        return list(self.prefill_by_name.values())

    @property
    def decode(self) -> list[Any]:
        return list(self.decode_by_name.values())

    @property
    def workers(self) -> list[Any]:
        return self.prefill + self.decode

    @property
    def workers_by_name(self) -> dict[str, Any]:
        return {**self.prefill_by_name, **self.decode_by_name}

    def stats(self) -> list[WorkerStats]:
        """Every worker's figures now, in `workers` order."""
        return [WorkerStats.from_wire(b) for b in ray.get([w.stats.remote() for w in self.workers])]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.prefill_by_name, self.decode_by_name = {}, {}


def _model_cluster(base: ClusterConfig, spec: ModelSpec) -> ClusterConfig:
    """One model's pools: the cluster's settings with the model's workers and engine."""
    return dataclasses.replace(base, num_prefill=spec.prefill, num_decode=spec.decode, engine=spec.engine)


class Service:
    """LocalClusters (one, or one per model of a `deployment`) plus their router: one router actor (restarted on
    the same port if it dies) or, with `router.replicas` >= 2, that many replicas behind Ray Serve's HTTP proxy
    (cluster/replicas.py).  With a deployment, `cluster` gives the settings every model's pools start from."""

    def __init__(
        self,
        cluster: ClusterConfig,
        router: RouterConfig | None = None,
        router_max_restarts: int = -1,
        deployment: Deployment | None = None,
    ) -> None:
        router = router or RouterConfig()
        if deployment is None or len(deployment.models) == 1:
            if deployment is not None:
                cluster = _model_cluster(cluster, deployment.models[0])
                router = dataclasses.replace(router, served_model_name=deployment.models[0].id)
            self.clusters = {"": LocalCluster(cluster)}
        else:
            self.clusters = {m.id: LocalCluster(_model_cluster(cluster, m), m.worker_prefix) for m in deployment.models}
        self.cluster = next(iter(self.clusters.values()))  # the first (or only) model's
        config = self.cluster.config
        # the router hashes blocks and bounds prompts as the engines do, and traces as they do unless told otherwise
        self.router_config = router = dataclasses.replace(
            router,
            model=config.engine.model,
            block_size=config.engine.block_size,
            max_model_len=config.engine.max_model_len,
            models=[_route(name, c) for name, c in self.clusters.items() if name],
        )
        if router.tracing is None:
            router.tracing = config.tracing
        if not router.port:  # pick it now, so a restarted router binds the same one
            router.port = free_port(router.host)
        prefill = [n for c in self.clusters.values() for n in c.prefill_by_name]
        workers = prefill, [n for c in self.clusters.values() for n in c.decode_by_name]
        self.router: Any = None  # the router actor (one replica)
        self.front: Any = None  # or Serve's replicas (cluster/replicas.py: ServeFront)
        if router.replicas > 1:
            from disagg.cluster.replicas import ServeFront  # Ray Serve is loaded only by clusters that use it

            self.front = ServeFront(router)
            self.url = self.front.start(*workers, resources=config.router_resources or None)
            return
        self.router = RouterActor.options(  # type: ignore[attr-defined]  # added by @ray.remote
            max_restarts=router_max_restarts, resources=config.router_resources or None
        ).remote(router.to_wire(), *workers)
        self.url = ray.get(self.router.get_url.remote())

    def shutdown(self) -> None:
        if self.front is not None:
            self.front.shutdown()
        else:
            try:
                ray.get(self.router.stop.remote(), timeout=10)
            except (ray.exceptions.RayError, TimeoutError) as exc:  # the router may already be gone
                print(f"router stop: {type(exc).__name__}", file=sys.stderr)
            ray.kill(self.router, no_restart=True)
        for cluster in self.clusters.values():
            cluster.shutdown()


def _route(name: str, cluster: LocalCluster) -> ModelRoute:
    """How the router serves one model of a deployment: its engines' block size and context, its workers, and
    its id as the namespace of its block hashes."""
    engine = cluster.config.engine
    prefill, decode = list(cluster.prefill_by_name), list(cluster.decode_by_name)
    return ModelRoute(name, engine.model, engine.block_size, engine.max_model_len, prefill, decode, namespace=name)


if __name__ == "__main__":  # `ray job submit -- python -m disagg.cluster.launch ...`
    from disagg.cluster.serve_cli import main

    sys.exit(main())
