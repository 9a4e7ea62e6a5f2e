"""Wake from sleep against a cold load of the same model, on a real cluster over HTTP (issue: several models, part 3).

One `disagg serve`-style service (Ray on 127.0.0.1) serves the default model on --decode aggregated workers with
--kv-mb of KV each.  Each repeat, interleaved:
  cold   `POST /admin/models` of a second copy (`smollm@N`: new worker processes, weights, KV cache, NIXL), 201 once
         it answers; then one completion on it (its time to first token); then `DELETE` it;
  sleep  `POST /admin/models/smollm/sleep` (the workers give their KV back), then `/wake`, then one completion.
A completion on the awake, warm model (a fresh prompt each time) is the baseline for "first request after".
Medians of --repeats with their range.

    .venv/bin/python -m bench.sleep --out bench/results/sleep.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import httpx
import ray

from bench.common import emit, print_table
from bench.dynamo_router import cpu_model
from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.config import EngineConfig
from disagg.models.deployment import deployment_of
from disagg.options import add_options, from_options

MODEL = "smollm"


@dataclass
class SleepBenchOptions:
    decode: int = field(default=1, metadata={"help": "aggregated workers of the served model"})
    kv_mb: int = field(default=256, metadata={"help": "KV cache per worker (MiB)"})
    repeats: int = field(default=3, metadata={"help": "runs per arm (interleaved)"})
    out: str = field(default="", metadata={"help": "write the result JSON here"})


def _timed(http: httpx.Client, method: str, url: str, body: dict | None = None) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    reply = http.request(method, url, json=body)
    elapsed = time.perf_counter() - started
    if reply.status_code >= 300:
        raise RuntimeError(f"{method} {url}: {reply.status_code} {reply.text}")
    return elapsed, reply


def _first_token_s(http: httpx.Client, model: str, n: int) -> float:
    """Time to the first streamed token of a fresh prompt (nothing cached)."""
    body = {
        "model": model,
        "prompt": f"Request {n}: the capital of France is",
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    with http.stream("POST", "/v1/completions", json=body) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - started
    raise RuntimeError(f"{model}: no token streamed (status {reply.status_code})")


def run(http: httpx.Client, opts: SleepBenchOptions) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {
        k: [] for k in ("load", "load_ttft", "unload", "sleep", "wake", "wake_ttft", "warm_ttft", "released_mib")
    }
    for i in range(opts.repeats):
        name = f"{MODEL}@{i}"
        entry = {
            "id": name,
            "prefill": 0,
            "decode": opts.decode,
            "engine": {"kv_cache_memory_mb": opts.kv_mb},
        }
        load_s, _ = _timed(http, "POST", "/admin/models", entry)
        runs["load"].append(load_s)
        runs["load_ttft"].append(_first_token_s(http, name, 100 + i))
        runs["unload"].append(_timed(http, "DELETE", f"/admin/models/{name}")[0])
        runs["warm_ttft"].append(_first_token_s(http, MODEL, 200 + i))
        sleep_s, slept = _timed(http, "POST", f"/admin/models/{MODEL}/sleep")
        runs["sleep"].append(sleep_s)
        runs["released_mib"].append(slept.json()["released_bytes"] / 2**20)
        runs["wake"].append(_timed(http, "POST", f"/admin/models/{MODEL}/wake")[0])
        runs["wake_ttft"].append(_first_token_s(http, MODEL, 300 + i))
        print({k: round(v[-1], 3) for k, v in runs.items()}, flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.sleep", description=__doc__.splitlines()[0])
    add_options(p, SleepBenchOptions)
    opts = from_options(SleepBenchOptions, p.parse_args(argv))
    deployment = deployment_of(
        {"models": [{"id": MODEL, "prefill": 0, "decode": opts.decode}]},
        base=EngineConfig(kv_cache_memory_mb=opts.kv_mb, num_threads=1),
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    service = Service(ClusterConfig(), RouterConfig(), deployment=deployment)
    try:
        with httpx.Client(base_url=service.url, timeout=300) as http:
            runs = run(http, opts)
    finally:
        service.shutdown()
        ray.shutdown()
    rows = [{"step": k, "median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in runs.items()]
    print_table(rows, f"sleep/wake vs cold load: {MODEL}, {opts.decode} worker(s), {opts.kv_mb} MiB KV each (s, MiB)")
    ratio = [load / wake for load, wake in zip(runs["load"], runs["wake"])]
    print(f"cold load / wake, per repeat: median {statistics.median(ratio):.0f}x ({min(ratio):.0f}-{max(ratio):.0f})")
    emit(
        {"options": dataclasses.asdict(opts), "cpu": cpu_model(), "runs": runs, "load_over_wake": ratio},
        opts.out or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
