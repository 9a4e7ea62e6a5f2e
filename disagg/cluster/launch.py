"""Start the serving system on Ray: engine workers, the router actor with its HTTP endpoint, and the wiring
(KV layouts exchanged once per decode/prefill pair; the router follows the workers' KV events).

Also the entrypoint for `disagg serve` and for `ray job submit -- python -m disagg.cluster.launch ...`
(inside a Ray job, `ray.init()` joins the job's cluster through RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray._private import ray_constants  # the one knob that keeps a local cluster on loopback (init_ray)

from disagg.cluster.actors import AggregatedWorker, DecodeWorker, PrefillWorker
from disagg.cluster.client import DisaggClient
from disagg.cluster.router_actor import RouterActor
from disagg.cluster.router_service import RouterConfig
from disagg.cluster.smoke import smoke_test
from disagg.cluster.worker_config import MockConfig, WorkerConfig, worker_tiers
from disagg.config import SERVE_KV_CACHE_MB, EngineConfig
from disagg.errors import InsecureExposure
from disagg.http.keys import load_keys_file
from disagg.http.server import free_port
from disagg.isolation import IsolationConfig
from disagg.kv.tier_config import TierConfig
from disagg.options import add_options, from_options
from disagg.planner.policy import PlannerConfig
from disagg.protocol import Role
from disagg.router.admission import AdmissionConfig, CapacityConfig
from disagg.router.canary import CanaryConfig
from disagg.router.core_config import RouterCoreConfig
from disagg.router.outliers import OutlierConfig
from disagg.router.policy import PolicyConfig
from disagg.router.watch import SilentConfig
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
    def __init__(self, config: ClusterConfig | None = None) -> None:
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
            name = f"prefill-{i}-{tag}"
            self.prefill_by_name[name] = PrefillWorker.options(  # type: ignore[attr-defined]  # added by @ray.remote
                name=name, max_restarts=config.max_restarts, resources=config.prefill_resources or None
            ).remote(config.worker(name, Role.PREFILL, f"prefill-{i}").to_wire())
        decode_cls, role, kind = (
            (DecodeWorker, Role.DECODE, "decode") if config.num_prefill else (AggregatedWorker, Role.BOTH, "worker")
        )
        for i in range(config.num_decode):
            name = f"decode-{i}-{tag}"
            self.decode_by_name[name] = decode_cls.options(  # type: ignore[union-attr]  # added by @ray.remote
                name=name, max_restarts=config.max_restarts, resources=config.decode_resources or None
            ).remote(config.worker(name, role, f"{kind}-{i}").to_wire())
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


class Service:
    """A LocalCluster plus its router: one router actor (restarted on the same port if it dies) or, with
    `router.replicas` >= 2, that many replicas behind Ray Serve's HTTP proxy (cluster/replicas.py)."""

    def __init__(
        self, cluster: ClusterConfig, router: RouterConfig | None = None, router_max_restarts: int = -1
    ) -> None:
        self.cluster = LocalCluster(cluster)
        config = self.cluster.config
        # the router hashes blocks and bounds prompts as the engines do, and traces as they do unless told otherwise
        self.router_config = router = dataclasses.replace(
            router or RouterConfig(),
            model=config.engine.model,
            block_size=config.engine.block_size,
            max_model_len=config.engine.max_model_len,
        )
        if router.tracing is None:
            router.tracing = config.tracing
        if not router.port:  # pick it now, so a restarted router binds the same one
            router.port = free_port(router.host)
        workers = list(self.cluster.prefill_by_name), list(self.cluster.decode_by_name)
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
        self.cluster.shutdown()


# `disagg serve`'s options, generated from the configs (disagg/options.py); the dests are the fields' names under
# the prefix, read back by the same (class, prefix, fields) in cluster_config_from_args / router_config_from_args
SERVE_PORT = 8000  # the CLI's documented port (the library's RouterConfig picks a free one)
_ENGINE = (
    "model",
    "block_size",
    "kv_cache_memory_mb",
    "max_model_len",
    "num_threads",
    "quantization",
    "kv_dtype",
    "speculative",
    "num_speculative_tokens",
    "prefill_chunk_target_ms",
    "min_prefill_chunk",
)
_POLICY = ("kind", "placement")
_TRACING, _ROUTER = ("otlp_endpoint", "file_dir", "sampling_ratio"), ("host", "port", "replicas", "api_key", "insecure")
_CANARY, _OUTLIERS = ("enabled", "idle_interval_s", "busy_interval_s"), ("enabled", "ratio")
_CAPACITY = ("max_prefill_queue_tokens", "max_running")
_ADMISSION = ("max_queued_requests", "default_deadline_s")
_MS_PER_S = 1000
EXIT_INSECURE = 2  # argparse's status for a refused command line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="disagg serve", description="Serve an OpenAI-compatible endpoint")
    add_options(p, ClusterConfig, only=("num_prefill", "num_decode", "address"))
    # several workers share one host: a KV cache and a torch thread each that fit next to each other
    add_options(p, EngineConfig, only=_ENGINE, defaults={"kv_cache_memory_mb": SERVE_KV_CACHE_MB, "num_threads": 1})
    add_options(p, RouterConfig, only=_ROUTER, defaults={"port": SERVE_PORT})
    add_options(p, PolicyConfig, prefix="policy-", only=_POLICY)
    add_options(p, TransportConfig)
    for role in ("router", "prefill", "decode"):
        p.add_argument(
            f"--{role}-resources",
            type=_resources,
            default={},
            help=f'Ray custom resources each {role} actor needs, as JSON (e.g. {{"disagg_{role}": 1}})',
        )
    tiers = TierConfig()  # sized in MiB here, in bytes there
    p.add_argument(
        "--cpu-tier-mb", type=int, default=tiers.cpu_bytes >> 20, help="CPU-memory KV tier per worker (0: no tiers)"
    )
    p.add_argument(
        "--disk-tier-dir",
        default=tiers.disk_root,
        help="root of the disk KV tier (a directory per worker; default ~/.cache/disagg/kv; '' = none)",
    )
    p.add_argument("--disk-tier-mb", type=int, default=tiers.disk_bytes >> 20, help="disk KV tier per worker")
    add_options(p, RouterCoreConfig, only=("max_migrations",))
    p.add_argument(
        "--api-keys-file",
        "--api-keys",  # the older name, same file format (a grant may be just a tenant name)
        dest="api_keys_file",
        default=None,
        help='JSON file {"KEY": "TENANT" or {"tenant": ..., "admin": ..., "max_priority": ..., "requests_per_s": ..., '
        '"burst": ..., "may_force_trace": ...}}: each key names a tenant and what it may do (disagg/http/keys.py)',
    )
    p.add_argument("--tenant-weights", default="", help="TENANT=WEIGHT,...: fair-share weights (default 1)")
    p.add_argument("--cache-share-groups", default="", help="TENANT=GROUP,...: tenants of a group share cache hits")
    add_options(p, AdmissionConfig, prefix="admission-", only=_ADMISSION)
    add_options(p, CapacityConfig, only=_CAPACITY)
    add_options(p, TracingConfig, only=_TRACING)
    add_options(p, PlannerConfig, prefix="planner-", only=("enabled",))
    add_options(p, CanaryConfig, prefix="canary-", only=_CANARY)
    add_options(p, OutlierConfig, prefix="outliers-", only=_OUTLIERS)
    planner = PlannerConfig()
    p.add_argument("--slo-ttft-ms", type=float, default=planner.ttft_slo_s * _MS_PER_S, help="planner, placement: TTFT")
    p.add_argument("--slo-tpot-ms", type=float, default=planner.tpot_slo_s * _MS_PER_S, help="planner: TPOT objective")
    p.add_argument("--smoke-test", action="store_true", help="send one chat request, print it, shut down")
    p.add_argument("--question", default="What is the capital of France?")
    return p


def _groups(text: str) -> dict[str, str]:
    pairs = [item.strip().partition("=") for item in text.split(",") if item.strip()]
    if any(not tenant or not group for tenant, _, group in pairs):
        raise ValueError(f"--cache-share-groups: expected TENANT=GROUP,..., got {text!r}")
    return {tenant: group for tenant, _, group in pairs}


def _weights(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        tenant, _, weight = item.partition("=")
        try:
            out[tenant] = float(weight)
        except ValueError:
            raise ValueError(f"bad tenant weight {item!r}: expected TENANT=WEIGHT") from None
    return out


def _resources(text: str) -> dict[str, float]:
    import json

    value = json.loads(text)
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a JSON object of resource amounts, got {text!r}")
    return {str(k): float(v) for k, v in value.items()}


def tier_options(args: argparse.Namespace) -> TierConfig | None:
    """The workers' tiers from the command line (the disk directory gets one sub-directory per worker)."""
    if args.cpu_tier_mb <= 0:
        return None
    return TierConfig(
        cpu_bytes=args.cpu_tier_mb << 20, disk_bytes=args.disk_tier_mb << 20, disk_root=args.disk_tier_dir
    )


def cluster_config_from_args(args: argparse.Namespace) -> ClusterConfig:
    tracing = from_options(TracingConfig, args, only=_TRACING)
    return from_options(
        ClusterConfig,
        args,
        only=("num_prefill", "num_decode", "address"),
        engine=from_options(EngineConfig, args, only=_ENGINE),
        tiers=tier_options(args),
        tracing=tracing if tracing.enabled else None,
        transport=from_options(TransportConfig, args),
        prefill_resources=args.prefill_resources,
        decode_resources=args.decode_resources,
        router_resources=args.router_resources,
    )


def router_config_from_args(args: argparse.Namespace) -> RouterConfig:
    planner = from_options(
        PlannerConfig,
        args,
        prefix="planner-",
        only=("enabled",),
        ttft_slo_s=args.slo_ttft_ms / _MS_PER_S,
        tpot_slo_s=args.slo_tpot_ms / _MS_PER_S,
    )
    return from_options(
        RouterConfig,
        args,
        only=_ROUTER,
        policy=from_options(PolicyConfig, args, prefix="policy-", only=_POLICY, ttft_target_s=planner.ttft_slo_s),
        keys=load_keys_file(args.api_keys_file) if args.api_keys_file else None,
        isolation=IsolationConfig(share_groups=_groups(args.cache_share_groups)),
        core=from_options(RouterCoreConfig, args, only=("max_migrations",)),
        planner=planner,
        silent=SilentConfig(
            canary=from_options(CanaryConfig, args, prefix="canary-", only=_CANARY),
            outliers=from_options(OutlierConfig, args, prefix="outliers-", only=_OUTLIERS),
        ),
        capacity=from_options(CapacityConfig, args, only=_CAPACITY),
        admission=from_options(
            AdmissionConfig, args, prefix="admission-", only=_ADMISSION, tenant_weights=_weights(args.tenant_weights)
        ),
    )


def serve(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cluster, router = cluster_config_from_args(args), router_config_from_args(args)
    try:
        router.check_exposure()  # before Ray starts: a refusal costs nothing
    except InsecureExposure as exc:
        print(f"disagg serve: {exc}", file=sys.stderr)
        return EXIT_INSECURE
    service = Service(cluster, router)
    model_name = service.cluster.config.engine.model.rstrip("/").split("/")[-1]
    print(
        f"disagg serving {model_name} at {service.url}/v1 ({cluster.num_prefill} prefill, {cluster.num_decode} "
        f"decode, {router.replicas} router replica(s), policy {router.policy.kind.value}; "
        f"started in {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    try:
        if args.smoke_test:
            smoke_test(service.url, model_name, router.api_key, args.question)
            return 0
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print("Ctrl-C to stop", flush=True)
        stop.wait()
        return 0
    finally:
        print("shutting down", flush=True)
        service.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    return serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
