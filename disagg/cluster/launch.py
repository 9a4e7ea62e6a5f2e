"""Start the serving system on Ray: engine workers, the router actor with its HTTP endpoint, and the wiring
(KV layouts exchanged once per decode/prefill pair; workers publish KV events to the router).

Also the entrypoint for `disagg serve` and for `ray job submit -- python -m disagg.cluster.launch ...`
(inside a Ray job, `ray.init()` joins the job's cluster through RAY_ADDRESS).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from disagg.cluster.actors import AggregatedWorker, DecodeWorker, PrefillWorker, RouterActor
from disagg.cluster.client import DisaggClient


@dataclass
class ClusterConfig:
    num_prefill: int = 1  # 0: aggregated workers (each prefills and decodes)
    num_decode: int = 1
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields for every worker
    address: str | None = None  # None: start an embedded local Ray cluster (or join RAY_ADDRESS)
    transfer_timeout_s: float = 10.0


class LocalCluster:
    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = config = config or ClusterConfig()
        if config.num_decode <= 0 or config.num_prefill < 0:
            raise ValueError("need num_decode >= 1 and num_prefill >= 0")
        if not ray.is_initialized():
            ray.init(address=config.address, include_dashboard=False)
        if not config.engine.get("model"):  # resolve once, so every worker and the router agree
            from disagg.model_store import default_model_dir
            config.engine = {**config.engine, "model": str(default_model_dir())}
        tag = uuid.uuid4().hex[:6]
        decode_cls = DecodeWorker if config.num_prefill else AggregatedWorker
        self.prefill_by_name = {f"prefill-{i}-{tag}": None for i in range(config.num_prefill)}
        self.decode_by_name = {f"decode-{i}-{tag}": None for i in range(config.num_decode)}
        for name in self.prefill_by_name:
            self.prefill_by_name[name] = PrefillWorker.remote(name, config.engine, config.transfer_timeout_s)
        for name in self.decode_by_name:
            self.decode_by_name[name] = decode_cls.remote(name, config.engine, config.transfer_timeout_s)
        ray.get([w.ready.remote() for w in self.workers])
        layouts = ray.get([p.layout.remote() for p in self.prefill])
        ray.get([d.add_peer.remote(layout) for d in self.decode for layout in layouts])
        self.client = DisaggClient(self.prefill, self.decode)

    @property
    def prefill(self) -> list[Any]:
        return list(self.prefill_by_name.values())

    @property
    def decode(self) -> list[Any]:
        return list(self.decode_by_name.values())

    @property
    def workers(self) -> list[Any]:
        return self.prefill + self.decode

    def stats(self) -> list[dict[str, Any]]:
        return ray.get([w.stats.remote() for w in self.workers])

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.prefill_by_name, self.decode_by_name = {}, {}


class Service:
    """A LocalCluster plus the router actor serving the OpenAI-compatible API."""

    def __init__(self, cluster: ClusterConfig, router: dict[str, Any] | None = None) -> None:
        self.cluster = LocalCluster(cluster)
        engine = self.cluster.config.engine
        router_config = {"block_size": engine.get("block_size", 16), "max_model_len": engine.get("max_model_len", 2048),
                         **(router or {}), "model": engine["model"]}
        self.router = RouterActor.remote(router_config, self.cluster.prefill_by_name, self.cluster.decode_by_name)
        self.url = ray.get(self.router.get_url.remote())
        ray.get([w.set_event_sink.remote(self.router) for w in self.cluster.workers])

    def shutdown(self) -> None:
        try:
            ray.get(self.router.stop.remote(), timeout=10)
        except Exception:  # the router may already be gone; the workers still get killed
            pass
        ray.kill(self.router)
        self.cluster.shutdown()


def smoke_test(url: str, model: str, api_key: str | None, question: str) -> None:
    """Send one real chat request through the official OpenAI client and print the answer."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "none")
    t0 = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=64, temperature=0)
    elapsed = time.perf_counter() - t0
    n = reply.usage.completion_tokens
    print(f">>> {question}\n{reply.choices[0].message.content}\n"
          f"[{n} tokens in {elapsed:.2f}s = {n / elapsed:.1f} tokens/s, finish={reply.choices[0].finish_reason}]")


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
    p.add_argument("--smoke-test", action="store_true", help="send one chat request, print it, shut down")
    p.add_argument("--question", default="What is the capital of France?")
    return p


def serve(args: argparse.Namespace) -> int:
    engine = {"kv_cache_memory_mb": args.kv_cache_mb, "max_model_len": args.max_model_len,
              "num_threads": args.threads}
    if args.model:
        engine["model"] = args.model
    t0 = time.perf_counter()
    service = Service(ClusterConfig(num_prefill=args.prefill, num_decode=args.decode, engine=engine,
                                    address=args.address),
                      {"policy": {"kind": args.policy}, "host": args.host, "port": args.port,
                       "api_key": args.api_key})
    model_name = service.cluster.config.engine["model"].rstrip("/").split("/")[-1]
    print(f"disagg serving {model_name} at {service.url}/v1 ({args.prefill} prefill, {args.decode} decode, "
          f"policy {args.policy}; started in {time.perf_counter() - t0:.1f}s)", flush=True)
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
