"""`disagg serve` (and `python -m disagg.cluster.launch` inside a Ray job): the command line, generated from the
config dataclasses (disagg/options.py), read back into a ClusterConfig and a RouterConfig, and the serving loop
(start the Service, print where it serves, wait for Ctrl-C or SIGTERM; `--smoke-test` sends one chat request).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from disagg.cluster.launch import ClusterConfig, Service
from disagg.cluster.router_service import RouterConfig
from disagg.cluster.smoke import smoke_test
from disagg.config import SERVE_KV_CACHE_MB, EngineConfig
from disagg.errors import InsecureExposure
from disagg.http.config import AgentConfig, IdleConfig
from disagg.http.file_store import FileStoreConfig
from disagg.http.keys import load_keys_file
from disagg.http.response_store import ResponseStoreConfig
from disagg.isolation import IsolationConfig
from disagg.kv.tier_config import TierConfig
from disagg.model_store import default_model_dir
from disagg.models.deployment import Deployment, DeploymentError, deployment_of, load_deployment
from disagg.options import add_options, from_options
from disagg.planner.fleet import FleetConfig
from disagg.planner.policy import PlannerConfig
from disagg.router.admission import AdmissionConfig, CapacityConfig
from disagg.router.canary import CanaryConfig
from disagg.router.core_config import RouterCoreConfig
from disagg.router.outliers import OutlierConfig
from disagg.router.policy import PolicyConfig
from disagg.router.watch import SilentConfig
from disagg.tracing import TracingConfig
from disagg.transfer.config import TransportConfig
from disagg.vision.images import ImageLimits
from disagg.vision.stage import EncodeConfig

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
    "quant_activations",
    "quant_repack",
    "kv_dtype",
    "speculative",
    "num_speculative_tokens",
    "max_num_batched_tokens",
    "prefill_chunk_target_ms",
    "min_prefill_chunk",
)
_POLICY = ("kind", "placement", "flexible", "ttft_correction_window")
_TRACING, _ROUTER = ("otlp_endpoint", "file_dir", "sampling_ratio"), ("host", "port", "replicas", "api_key", "insecure")
_CANARY, _OUTLIERS = ("enabled", "idle_interval_s", "busy_interval_s"), ("enabled", "ratio")
_CAPACITY = ("max_prefill_queue_tokens", "max_running")
_ADMISSION = ("max_queued_requests", "default_deadline_s")
_MS_PER_S = 1000
STOP_POLL_S = 0.5  # how often the serving loop looks for a stop signal (a signal wakes it at once anyway)
EXIT_REFUSED = 2  # argparse's status for a refused command line (an open public endpoint, a bad deployment)


def _pairs(text: str) -> dict[str, str]:
    pairs = [item.strip().partition("=") for item in text.split(",") if item.strip()]
    if any(not name or not value for name, _, value in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE,..., got {text!r}")
    return {name: value for name, _, value in pairs}


def _weights(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        tenant, _, weight = item.partition("=")
        try:
            out[tenant] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad tenant weight {item!r}: expected TENANT=WEIGHT") from None
    return out


def _resources(text: str) -> dict[str, float]:
    value = json.loads(text)
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a JSON object of resource amounts, got {text!r}")
    return {str(k): float(v) for k, v in value.items()}


def _resources_help(role: str) -> dict[str, object]:
    example = f'{{"disagg_{role}": 1}}'
    return {"parse": _resources, "help": f"Ray custom resources each {role} actor needs, as JSON (e.g. {example})"}


@dataclass
class ServeOptions:
    """`disagg serve`'s own options: settings whose form on the command line differs from the config field they
    feed (MiB for bytes, milliseconds for seconds, JSON or TENANT=X lists for maps, a file for the keys); each
    default is read from that field."""

    router_resources: dict[str, float] = field(default_factory=dict, metadata=_resources_help("router"))
    prefill_resources: dict[str, float] = field(default_factory=dict, metadata=_resources_help("prefill"))
    decode_resources: dict[str, float] = field(default_factory=dict, metadata=_resources_help("decode"))
    cpu_tier_mb: int = field(
        default=TierConfig.cpu_bytes >> 20, metadata={"help": "CPU-memory KV tier per worker in MiB (0: no tiers)"}
    )
    disk_tier_dir: str | None = field(
        default=TierConfig.disk_root,
        metadata={
            "parse": str,  # '' is a value here (no disk tier), not "unset"
            "help": "root of the disk KV tier (a directory per worker; default ~/.cache/disagg/kv; '' = none)",
        },
    )
    disk_tier_mb: int = field(default=TierConfig.disk_bytes >> 20, metadata={"help": "disk KV tier per worker in MiB"})
    api_keys_file: str | None = field(
        default=None,
        metadata={
            "aliases": ("--api-keys",),  # the older name, same file format (a grant may be just a tenant name)
            "help": 'JSON file {"KEY": "TENANT" or {"tenant": ..., "admin": ..., "max_priority": ..., '
            '"requests_per_s": ..., "burst": ..., "may_force_trace": ..., "metrics": ...}}: each key names a tenant '
            "and what it may do (disagg/http/keys.py)",
        },
    )
    tenant_weights: dict[str, float] = field(
        default_factory=dict, metadata={"parse": _weights, "help": "TENANT=WEIGHT,...: fair-share weights (default 1)"}
    )
    cache_share_groups: dict[str, str] = field(
        default_factory=dict,
        metadata={"parse": _pairs, "help": "TENANT=GROUP,...: tenants of a group share cache hits"},
    )
    slo_ttft_ms: float = field(
        default=PlannerConfig.ttft_slo_s * _MS_PER_S, metadata={"help": "planner, placement: TTFT objective (ms)"}
    )
    slo_tpot_ms: float = field(
        default=PlannerConfig.tpot_slo_s * _MS_PER_S,
        metadata={"help": "planner, flexible: TPOT objective (ms)"},
    )
    lora_modules: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "parse": _pairs,
            "help": "NAME=DIR,...: LoRA adapters (PEFT directories) of the --model, each served as a model named NAME",
        },
    )
    deployment: str | None = field(
        default=None,
        metadata={
            "help": "serve several models: a TOML, YAML or JSON file of [[models]] (id, path, prefill, decode, engine "
            "settings over these options'); see disagg/models/deployment.py. Default: the --model alone"
        },
    )
    smoke_test: bool = field(default=False, metadata={"help": "send one chat request, print it, shut down"})
    question: str = field(default="What is the capital of France?", metadata={"help": "the smoke test's question"})


_RESOURCES = ("router_resources", "prefill_resources", "decode_resources")
_TIERS = ("cpu_tier_mb", "disk_tier_dir", "disk_tier_mb")
_PINS = ("pin_budget_fraction", "tenant_pin_share")
_KEYS = ("api_keys_file", "tenant_weights", "cache_share_groups")
_SLO, _SMOKE = ("slo_ttft_ms", "slo_tpot_ms"), ("smoke_test", "question")
_MODELS = ("lora_modules", "deployment")
_IDLE = ("sleep_after_idle_s", "wake_on_request")
_POOLS = ("num_prefill", "num_decode", "num_encode", "encode_on_prefill", "address")
_ENCODE = ("remote_min_image_tokens", "max_inflight_per_encoder", "timeout_s")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="disagg serve", description="Serve an OpenAI-compatible endpoint")
    add_options(p, ClusterConfig, only=_POOLS)
    # several workers share one host: a KV cache and a torch thread each that fit next to each other
    add_options(p, EngineConfig, only=_ENGINE, defaults={"kv_cache_memory_mb": SERVE_KV_CACHE_MB, "num_threads": 1})
    add_options(p, ServeOptions, only=_MODELS)
    add_options(p, RouterConfig, only=_ROUTER, defaults={"port": SERVE_PORT})
    add_options(p, PolicyConfig, prefix="policy-", only=_POLICY)
    add_options(p, TransportConfig)
    add_options(p, ServeOptions, only=_RESOURCES + _TIERS)
    add_options(p, TierConfig, only=_PINS)
    add_options(p, RouterCoreConfig, only=("max_migrations",))
    add_options(p, ServeOptions, only=_KEYS)
    add_options(p, AdmissionConfig, prefix="admission-", only=_ADMISSION)
    add_options(p, ResponseStoreConfig, prefix="responses-")
    add_options(p, FileStoreConfig, prefix="files-")
    add_options(p, AgentConfig)
    add_options(p, IdleConfig, only=_IDLE)
    add_options(p, ImageLimits)
    add_options(p, EncodeConfig, prefix="encode-", only=_ENCODE)
    add_options(p, CapacityConfig, only=_CAPACITY)
    add_options(p, TracingConfig, only=_TRACING)
    add_options(p, PlannerConfig, prefix="planner-", only=("enabled",))
    add_options(p, FleetConfig, prefix="fleet-", only=("enabled",))
    add_options(p, CanaryConfig, prefix="canary-", only=_CANARY)
    add_options(p, OutlierConfig, prefix="outliers-", only=_OUTLIERS)
    add_options(p, ServeOptions, only=_SLO + _SMOKE)
    return p


def tier_options(args: argparse.Namespace) -> TierConfig | None:
    """The workers' tiers from the command line (the disk directory gets one sub-directory per worker)."""
    if args.cpu_tier_mb <= 0:
        return None
    return from_options(
        TierConfig,
        args,
        only=_PINS,
        cpu_bytes=args.cpu_tier_mb << 20,
        disk_bytes=args.disk_tier_mb << 20,
        disk_root=args.disk_tier_dir,
    )


def cluster_config_from_args(args: argparse.Namespace) -> ClusterConfig:
    tracing = from_options(TracingConfig, args, only=_TRACING)
    return from_options(
        ClusterConfig,
        args,
        only=_POOLS,
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
        policy=from_options(
            PolicyConfig,
            args,
            prefix="policy-",
            only=_POLICY,
            ttft_target_s=planner.ttft_slo_s,
            tpot_target_s=planner.tpot_slo_s,
        ),
        keys=load_keys_file(args.api_keys_file) if args.api_keys_file else None,
        responses=from_options(ResponseStoreConfig, args, prefix="responses-"),
        files=from_options(FileStoreConfig, args, prefix="files-"),
        agents=from_options(AgentConfig, args),
        idle=from_options(IdleConfig, args, only=_IDLE),
        images=from_options(ImageLimits, args),
        encode=from_options(EncodeConfig, args, prefix="encode-", only=_ENCODE),
        isolation=IsolationConfig(share_groups=args.cache_share_groups),
        core=from_options(RouterCoreConfig, args, only=("max_migrations",)),
        planner=planner,
        fleet=from_options(FleetConfig, args, prefix="fleet-", only=("enabled",)),
        silent=SilentConfig(
            canary=from_options(CanaryConfig, args, prefix="canary-", only=_CANARY),
            outliers=from_options(OutlierConfig, args, prefix="outliers-", only=_OUTLIERS),
        ),
        capacity=from_options(CapacityConfig, args, only=_CAPACITY),
        admission=from_options(
            AdmissionConfig, args, prefix="admission-", only=_ADMISSION, tenant_weights=args.tenant_weights
        ),
    )


def _deployment(args: argparse.Namespace, cluster: ClusterConfig, router: RouterConfig) -> Deployment | None:
    """The deployment file's; or, with --lora-modules, the one --model with its adapters; else None."""
    if args.deployment:
        if args.lora_modules:
            raise DeploymentError("--lora-modules names the --model's adapters: with --deployment, list them there")
        return load_deployment(args.deployment, base=cluster.engine)
    if not args.lora_modules:
        return None
    model = cluster.engine.model
    name = router.served_model_name or Path(model or default_model_dir()).name
    entry = {"id": name, "path": model, "prefill": cluster.num_prefill, "decode": cluster.num_decode}
    return deployment_of({"models": [{**entry, "adapters": args.lora_modules}]}, base=cluster.engine)


def wait_for_stop(signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> signal.Signals:
    """Block until one of `signals` arrives; the previous handlers are back afterwards.  The handler only records
    the signal: one that set a threading.Event could run while this (main) thread sat inside Event.wait holding
    the Event's lock, and wait for that lock forever - a second Ctrl-C then hung `disagg serve` for good."""
    received: list[signal.Signals] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: received.append(signal.Signals(signum))) for sig in signals
    }
    try:
        while not received:
            time.sleep(STOP_POLL_S)  # a signal cuts the sleep short; its handler has run when the check comes
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return received[0]


def serve(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cluster, router = cluster_config_from_args(args), router_config_from_args(args)
    try:
        router.check_exposure()  # before Ray starts: a refusal costs nothing
        deployment = _deployment(args, cluster, router)
        if router.fleet.enabled and router.replicas > 1:  # each replica would move workers on its own
            raise DeploymentError("--fleet-planner needs a single router (--replicas 1)")
        if router.idle.wakes and router.replicas > 1:  # each replica would sleep and wake the models on its own
            raise DeploymentError("--sleep-after-idle-s and --wake-on-request need a single router (--replicas 1)")
        if deployment is not None and any(m.standby for m in deployment.models) and not router.fleet.enabled:
            print("disagg serve: standby workers stay asleep without --fleet-planner", file=sys.stderr)
    except (InsecureExposure, DeploymentError) as exc:  # refused before anything starts
        print(f"disagg serve: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    service = Service(cluster, router, deployment=deployment)
    if deployment is None:
        model_name = service.cluster.config.engine.model.rstrip("/").split("/")[-1]
        pools = f"{cluster.num_prefill} prefill, {cluster.num_decode} decode"
    else:
        model_name = deployment.models[0].id
        pools = "; ".join(
            f"{m.id}: {m.prefill} prefill, {m.decode} decode" + (f", {m.standby} standby" if m.standby else "")
            for m in deployment.models
        )
    print(
        f"disagg serving {', '.join(deployment.ids()) if deployment else model_name} at {service.url}/v1 ({pools}, "
        f"{router.replicas} router replica(s), policy {router.policy.kind.value}; "
        f"started in {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    try:
        if args.smoke_test:
            # any key the front door takes: the operator's, else the keys file's first
            key = router.api_key or next(iter(router.keys or router.api_keys or {}), None)
            smoke_test(service.url, model_name, key, args.question)
            return 0
        print("Ctrl-C to stop", flush=True)
        wait_for_stop()
        return 0
    finally:
        print("shutting down", flush=True)
        service.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    return serve(build_parser().parse_args(argv))
