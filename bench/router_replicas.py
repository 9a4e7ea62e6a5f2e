"""Routing throughput of 1 and 2 router replicas on a router-bound load (issue: router tier, part 2).

The workers are mock engines (disagg/cluster/mocker.py: real workers, the simulator's model, steps that take no
time), so the model costs nothing and the router tier is what limits the rate.  Closed loop: --concurrency clients
each send a short completion (a shared prefix plus a unique tail, --max-tokens 1) and send the next when it is
answered; completed requests per second over --duration seconds.  Both arms are Ray Serve deployments of the same
RouterReplica in front of the same workers (one replica, then two), behind the same Serve proxy, so the only
difference is the replica count.  Arms interleaved, --repeats times; medians with their range.

    .venv/bin/python -m bench.router_replicas --out bench/results/router_replicas.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import httpx

from bench.common import emit, print_table
from bench.dynamo_router import cpu_model
from disagg.cluster.launch import ClusterConfig, LocalCluster
from disagg.cluster.replicas import ServeFront
from disagg.cluster.router_service import RouterConfig
from disagg.cluster.worker_config import MockConfig
from disagg.config import EngineConfig
from disagg.http.server import free_port
from disagg.options import add_options, from_options


@dataclass
class ReplicaBenchOptions:
    workers: int = field(default=2, metadata={"help": "mock workers (aggregated)"})
    replicas: str = field(default="1,2", metadata={"help": "replica counts to compare"})
    concurrency: int = field(default=32, metadata={"help": "clients in the closed loop"})
    duration: float = field(default=20.0, metadata={"help": "seconds measured per run"})
    warmup: float = field(default=3.0, metadata={"help": "seconds of load before measuring"})
    repeats: int = field(default=3, metadata={"help": "runs per arm (interleaved)"})
    prompt_tokens: int = field(default=64, metadata={"help": "prompt tokens (a shared prefix + a unique tail)"})
    out: str = field(default="", metadata={"help": "write the result JSON here"})


async def closed_loop(url: str, model: str, opts: ReplicaBenchOptions) -> float:
    """Completed requests per second over `duration`, after `warmup`."""
    prefix = [200 + (7 * j) % 30000 for j in range(opts.prompt_tokens - 4)]
    done: list[float] = []
    stop_at = time.monotonic() + opts.warmup + opts.duration

    async def client(c: int, http: httpx.AsyncClient) -> None:
        n = 0
        while time.monotonic() < stop_at:
            body = {"model": model, "prompt": [*prefix, c, n % 97, 5, 6], "max_tokens": 1, "temperature": 0}
            r = await http.post("/v1/completions", json=body)
            if r.status_code == 200:
                done.append(time.monotonic())
            n += 1

    limits = httpx.Limits(max_connections=opts.concurrency, max_keepalive_connections=opts.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        start = time.monotonic() + opts.warmup
        await asyncio.gather(*(client(c, http) for c in range(opts.concurrency)))
    counted = [t for t in done if t >= start]
    return len(counted) / opts.duration


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.router_replicas", description=__doc__.splitlines()[0])
    add_options(p, ReplicaBenchOptions)
    opts = from_options(ReplicaBenchOptions, p.parse_args(argv))
    cluster = LocalCluster(
        ClusterConfig(num_prefill=0, num_decode=opts.workers, engine=EngineConfig(), tiers=None, mock=MockConfig())
    )
    model_dir = cluster.config.engine.model
    base = RouterConfig(model=model_dir, port=free_port(), block_size=cluster.config.engine.block_size)
    counts = [int(n) for n in opts.replicas.split(",")]
    rates: dict[int, list[float]] = {n: [] for n in counts}
    try:
        for _ in range(opts.repeats):
            for n in counts:
                front = ServeFront(dataclasses.replace(base, replicas=n))
                url = front.start(list(cluster.prefill_by_name), list(cluster.decode_by_name))
                rate = asyncio.run(closed_loop(url, model_dir.rstrip("/").split("/")[-1], opts))
                front.shutdown()
                rates[n].append(rate)
                print(f"{n} replica(s): {rate:.1f} req/s", flush=True)
    finally:
        cluster.shutdown()
    one = statistics.median(rates[counts[0]])
    rows = [
        {
            "replicas": n,
            "req/s median": f"{statistics.median(r):.1f}",
            "range": f"{min(r):.1f}-{max(r):.1f}",
            "vs first": f"{statistics.median(r) / one:.2f}x",
        }
        for n, r in rates.items()
    ]
    print_table(rows, f"routing throughput, {opts.workers} mock workers, {opts.concurrency} clients")
    emit({"options": dataclasses.asdict(opts), "cpu": cpu_model(), "rates": rates}, opts.out or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
