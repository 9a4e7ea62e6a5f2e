"""Worker pools on Ray: a `ClusterConfig` (how many prefill and decode workers, their engine, tiers and transport)
and the `LocalCluster` that starts them as named actors and wires them (KV layouts exchanged once per pair: every
worker can read every other's blocks).  One LocalCluster serves one model; a deployment of several models has one
each (cluster/launch.py's Service at start-up, cluster/model_loader.py at run time).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray._private import ray_constants  # the one knob that keeps a local cluster on loopback (init_ray)

from disagg.cluster.actors import AggregatedWorker, DecodeWorker, PrefillWorker
from disagg.cluster.client import DisaggClient
from disagg.cluster.encoder import EncoderWorker
from disagg.cluster.worker_config import MockConfig, WorkerConfig, worker_tiers
from disagg.config import EngineConfig
from disagg.kv.tier_config import TierConfig
from disagg.models.deployment import ModelSpec
from disagg.protocol import Role
from disagg.stats import WorkerStats
from disagg.tracing import TracingConfig
from disagg.transfer.config import TransportConfig
from disagg.vision.spec import VisionSpec


@dataclass
class ClusterConfig:
    num_prefill: int = field(
        default=1, metadata={"flag": "--prefill", "help": "prefill workers (0: aggregated workers)"}
    )
    num_decode: int = field(default=1, metadata={"flag": "--decode", "help": "decode (or aggregated) workers"})
    num_encode: int = field(
        default=0, metadata={"flag": "--encode", "help": "encoder workers for a VLM's images (E/PD; 0: colocated)"}
    )
    encode_on_prefill: int = field(
        default=0,
        metadata={
            "help": "prefill workers that also encode the images of requests prefilled elsewhere (E/PD without "
            "an encoder worker of its own: its core prefills text when images are rare)"
        },
    )
    # of which the last ones start asleep and parked (a deployment's `standby`: the fleet planner wakes them)
    num_standby: int = field(default=0, metadata={"cli": False})
    engine: EngineConfig = field(default_factory=EngineConfig)  # every worker's ("" model: the default model)
    # every worker's, each with its own disk directory under disk_root (worker_tiers); None: no CPU/disk tiers
    tiers: TierConfig | None = field(default_factory=TierConfig)
    # None: start an embedded local Ray cluster (or join RAY_ADDRESS)
    address: str | None = field(default=None, metadata={"help": "join an existing Ray cluster instead of starting one"})
    transfer_timeout_s: float = 10.0
    max_restarts: int = -1  # per worker actor (-1: always restart)
    # detached actors outlive the process that started them: the pools of a model loaded at run time outlive the
    # router that loaded it (cluster/runtime_table.py); ended by unload or Service.shutdown
    detached: bool = field(default=False, metadata={"cli": False})
    transport_wrapper: str = ""  # WorkerConfig.transport_wrapper (the chaos benchmark's fault injector)
    allow_fault_injection: bool = False  # WorkerConfig's: drills only (bench chaos, tests), no `disagg serve` option
    tracing: TracingConfig | None = None  # the workers' spans (and the router's, via Service); None: none
    transport: TransportConfig = field(default_factory=TransportConfig)  # the workers' UCX devices
    # Ray custom resources each actor needs, to place roles on nodes that offer them (multi-node clusters,
    # KubeRay groups); empty: anywhere
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    router_resources: dict[str, float] = field(default_factory=dict)
    encode_resources: dict[str, float] = field(default_factory=dict)
    mock: MockConfig | None = None  # mock engines (cluster/mocker.py: no model, no KV tiers); None: the model

    def for_model(self, spec: ModelSpec) -> ClusterConfig:
        """One model's pools: these settings with the model's workers and engine."""
        return dataclasses.replace(
            self,
            num_prefill=spec.prefill,
            num_decode=spec.decode + spec.standby,
            num_standby=spec.standby,
            engine=spec.engine,
            num_encode=spec.encode,  # encoder workers serve one model's images: its own
            encode_on_prefill=spec.encode_on_prefill,
        )

    def template(self) -> WorkerConfig:
        """Every worker's settings as one message (name, role and disk directory are each worker's own): what the
        router starts models loaded at run time from (`from_template`)."""
        return dataclasses.replace(self.worker("", Role.BOTH, ""), tiers=self.tiers)

    @classmethod
    def from_template(cls, template: WorkerConfig, spec: ModelSpec) -> ClusterConfig:
        """The pools of `spec` with `template`'s settings (restarts and Ray resources: the defaults)."""
        return cls(
            tiers=template.tiers,
            transfer_timeout_s=template.transfer_timeout_s,
            transport_wrapper=template.transport_wrapper,
            allow_fault_injection=template.allow_fault_injection,
            tracing=template.tracing,
            transport=template.transport,
            mock=template.mock,
        ).for_model(spec)

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


# named, not anonymous: the workers of models loaded at run time are detached actors (cluster/runtime_table.py),
# found by name in the namespace they were made in
RAY_NAMESPACE = "disagg"


def init_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS), or start a local cluster whose node IP is loopback."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, include_dashboard=False, namespace=RAY_NAMESPACE)
    else:
        # Ray maps 127.0.0.1 to the host's outward address (services.resolve_ip_for_localhost) unless its cluster
        # mode is off; a cluster started here is reached by no other host, so it stays on loopback
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", namespace=RAY_NAMESPACE)


class LocalCluster:
    def __init__(self, config: ClusterConfig | None = None, prefix: str = "", actor_prefix: str = "") -> None:
        """`prefix`: what its workers' names and disk-tier directories start with (one model of a deployment);
        `actor_prefix`: before that in the actors' names only (a router's run-time workers: runtime_table.py)."""
        self.config = config = config or ClusterConfig()
        if config.num_decode <= 0 or config.num_prefill < 0 or not 0 <= config.num_standby < config.num_decode:
            raise ValueError("need num_decode >= 1, num_prefill >= 0 and 0 <= num_standby < num_decode")
        init_ray(config.address)
        if not config.engine.model:  # resolve once, so every worker and the router agree
            from disagg.model_store import default_model_dir

            config.engine = dataclasses.replace(config.engine, model=str(default_model_dir()))
        self._check_encoders(config)  # before any worker starts
        tag = uuid.uuid4().hex[:6]
        self.prefill_by_name: dict[str, Any] = {}
        self.decode_by_name: dict[str, Any] = {}
        for i in range(config.num_prefill):
            name = f"{actor_prefix}{prefix}prefill-{i}-{tag}"
            self.prefill_by_name[name] = PrefillWorker.options(  # type: ignore[attr-defined]  # added by @ray.remote
                name=name,
                max_restarts=config.max_restarts,
                resources=config.prefill_resources or None,
                lifetime="detached" if config.detached else None,
            ).remote(config.worker(name, Role.PREFILL, f"{prefix}prefill-{i}").to_wire())
        decode_cls, role, kind = (
            (DecodeWorker, Role.DECODE, "decode") if config.num_prefill else (AggregatedWorker, Role.BOTH, "worker")
        )
        for i in range(config.num_decode):
            name = f"{actor_prefix}{prefix}decode-{i}-{tag}"
            self.decode_by_name[name] = decode_cls.options(  # type: ignore[union-attr]  # added by @ray.remote
                name=name,
                max_restarts=config.max_restarts,
                resources=config.decode_resources or None,
                lifetime="detached" if config.detached else None,
            ).remote(config.worker(name, role, f"{prefix}{kind}-{i}").to_wire())
        names = [f"{actor_prefix}{prefix}encode-{i}-{tag}" for i in range(config.num_encode)]
        self.encode_by_name = {name: self._encoder(name) for name in names}
        # prefill workers that encode for the others too: encoders to the router, ended as the workers they are
        self.encode_shared = dict(list(self.prefill_by_name.items())[: config.encode_on_prefill])
        try:
            ray.get([e.ready.remote() for e in self.encode_by_name.values()])
            ray.get([w.ready.remote() for w in self.workers])
            layouts = ray.get([w.layout.remote() for w in self.workers])
            ray.get([w.set_peers.remote(layouts) for w in self.workers])  # every worker can read every other
            # asleep before the router first sees them: it parks workers that report themselves asleep
            ray.get([self.decode_by_name[n].sleep.remote() for n in self.standby])
        except ray.exceptions.RayError:  # one refused to start: none of them is left running
            self.shutdown()
            raise
        self.client = DisaggClient(self.prefill_by_name, self.decode_by_name)

    @staticmethod
    def _check_encoders(config: ClusterConfig) -> None:
        for flag, n in (("--encode", config.num_encode), ("--encode-on-prefill", config.encode_on_prefill)):
            if n and VisionSpec.from_dir(config.engine.model) is None:
                raise ValueError(f"{flag} {n}: {config.engine.model} is not a vision-language model")
        if not 0 <= config.encode_on_prefill <= config.num_prefill:
            raise ValueError(f"--encode-on-prefill {config.encode_on_prefill}: of {config.num_prefill} prefill workers")

    @property
    def encoders_by_name(self) -> dict[str, Any]:
        """Whatever encodes images for the router: encoder workers, and prefill workers that encode too."""
        return {**self.encode_by_name, **self.encode_shared}

    def _encoder(self, name: str) -> Any:
        config = self.config
        return EncoderWorker.options(  # type: ignore[attr-defined]  # added by @ray.remote
            name=name,
            max_restarts=config.max_restarts,
            resources=config.encode_resources or None,
            lifetime="detached" if config.detached else None,
        ).remote(config.engine.model, WorkerConfig.image_cache_bytes, config.engine.num_threads)

    @property
    def standby(self) -> list[str]:
        """The names of the decode workers started asleep (the last `num_standby`)."""
        names = list(self.decode_by_name)
        return names[len(names) - self.config.num_standby :]

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
        for worker in self.workers + list(self.encode_by_name.values()):
            ray.kill(worker, no_restart=True)
        self.prefill_by_name, self.decode_by_name, self.encode_by_name, self.encode_shared = {}, {}, {}, {}
