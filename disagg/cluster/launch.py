"""Start the serving system on Ray: engine workers, the router actor with its HTTP endpoint, and the wiring
(KV layouts exchanged once per decode/prefill pair; workers publish KV events to the router).

Also the entrypoint for `disagg serve` and for `ray job submit -- python -m disagg.cluster.launch ...`
(inside a Ray job, `ray.init()` joins the job's cluster through RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
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
from disagg.cluster.worker import worker_tiers
from disagg.http.server import free_port
from disagg.protocol import WorkerStats


@dataclass
class ClusterConfig:
    num_prefill: int = 1  # 0: aggregated workers (each prefills and decodes)
    num_decode: int = 1
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields for every worker
    tiers: dict[str, Any] | None = field(default_factory=dict)  # TierConfig fields; None: no CPU/disk tiers
    address: str | None = None  # None: start an embedded local Ray cluster (or join RAY_ADDRESS)
    transfer_timeout_s: float = 10.0
    max_restarts: int = -1  # per worker actor (-1: always restart)
    transport_wrapper: str = ""  # WorkerConfig.transport_wrapper (the chaos benchmark's fault injector)
    tracing: dict[str, Any] | None = None  # TracingConfig fields for the workers (and the router, via Service)
    transport: dict[str, Any] = field(default_factory=dict)  # TransportConfig fields (UCX devices) for the workers
    # Ray custom resources each actor needs, to place roles on nodes that offer them (multi-node clusters,
    # KubeRay groups); empty: anywhere
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    router_resources: dict[str, float] = field(default_factory=dict)


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
        if not config.engine.get("model"):  # resolve once, so every worker and the router agree
            from disagg.model_store import default_model_dir

            config.engine = {**config.engine, "model": str(default_model_dir())}
        tag = uuid.uuid4().hex[:6]
        decode_cls = DecodeWorker if config.num_prefill else AggregatedWorker
        options = {
            "transfer_timeout_s": config.transfer_timeout_s,
            "transport_wrapper": config.transport_wrapper,
            "tracing": config.tracing,
            "transport": config.transport,
        }
        self.prefill_by_name: dict[str, Any] = {}
        self.decode_by_name: dict[str, Any] = {}
        for i in range(config.num_prefill):
            name = f"prefill-{i}-{tag}"
            self.prefill_by_name[name] = PrefillWorker.options(  # type: ignore[attr-defined]  # added by @ray.remote
                name=name, max_restarts=config.max_restarts, resources=config.prefill_resources or None
            ).remote(name, config.engine, tiers=worker_tiers(config.tiers, f"prefill-{i}"), **options)
        kind = "decode" if config.num_prefill else "worker"
        for i in range(config.num_decode):
            name = f"decode-{i}-{tag}"
            self.decode_by_name[name] = decode_cls.options(  # type: ignore[union-attr]  # added by @ray.remote
                name=name, max_restarts=config.max_restarts, resources=config.decode_resources or None
            ).remote(name, config.engine, tiers=worker_tiers(config.tiers, f"{kind}-{i}"), **options)
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
    """A LocalCluster plus the router actor serving the OpenAI-compatible API (restarted on the same port if it
    dies)."""

    def __init__(
        self, cluster: ClusterConfig, router: dict[str, Any] | None = None, router_max_restarts: int = -1
    ) -> None:
        self.cluster = LocalCluster(cluster)
        engine = self.cluster.config.engine
        router_config = {
            "block_size": engine.get("block_size", 16),
            "max_model_len": engine.get("max_model_len", 2048),
            **(router or {}),
            "model": engine["model"],
        }
        if self.cluster.config.tracing and "tracing" not in router_config:
            router_config["tracing"] = self.cluster.config.tracing
        if not router_config.get("port"):  # pick it now, so a restarted router binds the same one
            router_config["port"] = free_port(router_config.get("host", "127.0.0.1"))
        self.router = RouterActor.options(  # type: ignore[attr-defined]  # added by @ray.remote
            max_restarts=router_max_restarts, resources=self.cluster.config.router_resources or None
        ).remote(router_config, list(self.cluster.prefill_by_name), list(self.cluster.decode_by_name))
        self.url = ray.get(self.router.get_url.remote())
        ray.get([w.set_event_sink.remote(self.router) for w in self.cluster.workers])

    def shutdown(self) -> None:
        try:
            ray.get(self.router.stop.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError) as exc:  # the router may already be gone
            print(f"router stop: {type(exc).__name__}", file=sys.stderr)
        ray.kill(self.router, no_restart=True)
        self.cluster.shutdown()


def smoke_test(url: str, model: str, api_key: str | None, question: str) -> None:
    """Send one real chat request through the official OpenAI client and print the answer."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "none")
    t0 = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0
    )
    elapsed = time.perf_counter() - t0
    if reply.usage is None:
        raise RuntimeError("the endpoint answered without usage")
    n = reply.usage.completion_tokens
    print(
        f">>> {question}\n{reply.choices[0].message.content}\n"
        f"[{n} tokens in {elapsed:.2f}s = {n / elapsed:.1f} tokens/s, finish={reply.choices[0].finish_reason}]"
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="disagg serve", description="Serve an OpenAI-compatible endpoint")
    p.add_argument("--model", default="", help="HF-format model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (0: aggregated workers)")
    p.add_argument("--decode", type=int, default=1, help="decode (or aggregated) workers")
    p.add_argument("--policy", default="kv", choices=["kv", "round_robin", "least_loaded"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="join an existing Ray cluster instead of starting one")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache per worker")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (a power of two)")
    p.add_argument(
        "--ucx-net-devices",
        default="auto",
        help="network devices UCX carries KV over: auto (every interface that is up with an IPv4 address), "
        "or a UCX list such as lo, eth0, mlx5_0:1 (UCX_NET_DEVICES in the environment wins over auto)",
    )
    p.add_argument(
        "--nixl-progress-delay-us",
        type=int,
        default=1000,
        help="longest sleep of the NIXL progress thread between wake-ups (it wakes at once on transfers); "
        "0 is NIXL's own setting, which spins one core per worker",
    )
    for role in ("router", "prefill", "decode"):
        p.add_argument(
            f"--{role}-resources",
            type=_resources,
            default={},
            help=f'Ray custom resources each {role} actor needs, as JSON (e.g. {{"disagg_{role}": 1}})',
        )
    p.add_argument("--cpu-tier-mb", type=int, default=256, help="CPU-memory KV tier per worker (0: no tiers)")
    p.add_argument(
        "--disk-tier-dir",
        default=None,
        help="root of the disk KV tier (a directory per worker; default ~/.cache/disagg/kv; '' = none)",
    )
    p.add_argument("--disk-tier-mb", type=int, default=1024, help="disk KV tier per worker")
    p.add_argument("--max-migrations", type=int, default=3, help="times a request may move to another worker")
    p.add_argument(
        "--api-keys",
        default=None,
        help='JSON file {"KEY": "TENANT", ...}: several keys, each naming a tenant for fair sharing',
    )
    p.add_argument("--tenant-weights", default="", help="TENANT=WEIGHT,...: fair-share weights (default 1)")
    p.add_argument("--queue-max-requests", type=int, default=1024, help="admission queue bound (429 beyond)")
    p.add_argument("--max-running", type=int, default=64, help="admission: in-flight requests per worker")
    p.add_argument(
        "--max-prefill-queue-tokens",
        type=int,
        default=4096,
        help="admission: prompt tokens queued on a worker before it counts as saturated",
    )
    p.add_argument(
        "--queue-deadline-s",
        type=float,
        default=60.0,
        help="a request that cannot start within this gets 429 (per request: body field deadline_s)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export OpenTelemetry spans over OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces (off by default)",
    )
    p.add_argument(
        "--planner",
        action="store_true",
        help="let the planner move workers between prefill and decode at runtime to keep the SLOs below",
    )
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="planner: TTFT objective")
    p.add_argument("--slo-tpot-ms", type=float, default=200.0, help="planner: TPOT objective")
    p.add_argument("--trace-sample-ratio", type=float, default=1.0, help="share of new traces sampled")
    p.add_argument("--trace-dir", default=None, help="also write spans as JSON lines into this directory")
    p.add_argument("--smoke-test", action="store_true", help="send one chat request, print it, shut down")
    p.add_argument("--question", default="What is the capital of France?")
    return p


def _api_keys(path: str | None) -> dict[str, str] | None:
    if not path:
        return None
    import json

    keys = json.loads(open(path).read())
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise ValueError(f"{path}: expected a JSON object mapping API keys to tenant names")
    return keys


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


def tier_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """TierConfig fields from the command line (the disk directory gets one sub-directory per worker)."""
    if args.cpu_tier_mb <= 0:
        return None
    tiers: dict[str, Any] = {"cpu_bytes": args.cpu_tier_mb << 20, "disk_bytes": args.disk_tier_mb << 20}
    if args.disk_tier_dir is not None:
        tiers["disk_root"] = args.disk_tier_dir
    return tiers


def cluster_config_from_args(args: argparse.Namespace) -> ClusterConfig:
    engine = {
        "kv_cache_memory_mb": args.kv_cache_mb,
        "max_model_len": args.max_model_len,
        "num_threads": args.threads,
        "block_size": args.block_size,
    }
    if args.model:
        engine["model"] = args.model
    tracing = None
    if args.otlp_endpoint or args.trace_dir:
        tracing = {
            "otlp_endpoint": args.otlp_endpoint,
            "file_dir": args.trace_dir,
            "sampling_ratio": args.trace_sample_ratio,
        }
    return ClusterConfig(
        num_prefill=args.prefill,
        num_decode=args.decode,
        engine=engine,
        address=args.address,
        tiers=tier_options(args),
        tracing=tracing,
        transport={"ucx_net_devices": args.ucx_net_devices, "progress_delay_us": args.nixl_progress_delay_us},
        prefill_resources=args.prefill_resources,
        decode_resources=args.decode_resources,
        router_resources=args.router_resources,
    )


def serve(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    service = Service(
        cluster_config_from_args(args),
        {
            "policy": {"kind": args.policy},
            "host": args.host,
            "port": args.port,
            "api_key": args.api_key,
            "api_keys": _api_keys(args.api_keys),
            "core": {"max_migrations": args.max_migrations},
            "planner": {
                "enabled": args.planner,
                "ttft_slo_s": args.slo_ttft_ms / 1000,
                "tpot_slo_s": args.slo_tpot_ms / 1000,
            },
            "capacity": {"max_running": args.max_running, "max_prefill_queue_tokens": args.max_prefill_queue_tokens},
            "admission": {
                "max_queued_requests": args.queue_max_requests,
                "default_deadline_s": args.queue_deadline_s,
                "tenant_weights": _weights(args.tenant_weights),
            },
        },
    )
    model_name = service.cluster.config.engine["model"].rstrip("/").split("/")[-1]
    print(
        f"disagg serving {model_name} at {service.url}/v1 ({args.prefill} prefill, {args.decode} decode, "
        f"policy {args.policy}; started in {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    try:
        if args.smoke_test:
            smoke_test(service.url, model_name, args.api_key, args.question)
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
