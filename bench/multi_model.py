"""Two models behind one router against two separate clusters, and a noisy neighbour (issue: several models, goals
1 and 4), on real Ray clusters over HTTP with mock workers (cluster/mocker.py: real workers, scheduler, KV events
and streams; each step sleeps the step-time model's time, so the workers' capacity is theirs, not the 2 cores').

Workload: the Mooncake conversation trace mapped to model `chat`, the synthetic trace to model `code` (the first
--limit requests of each; hash ids of --block-tokens tokens), Poisson arrivals.

  shared     one router serving both models, --workers each (a deployment of two models); each model's trace is
             its own Poisson stream at --rate / 2, both sent at once;
  separate   one cluster per model with its --workers, side by side (one Ray cluster, names apart), the same two
             streams at the same time.
  neighbour  the shared cluster: `chat` alone at --rate / 2, then with `code` sent at --overload times the
             capacity its workers showed (measured first, with a saturating burst); `chat`'s TTFT p99 with and
             without the neighbour.
Goodput is compared as requests meeting both SLOs (TTFT and TPOT): both arms get the same requests at the same
times.  Arms interleaved, --repeats times; medians with their range.

    .venv/bin/python -m bench.multi_model --out bench/results/multi_model.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import ray

from bench.common import emit, median_range, print_table
from bench.dynamo_router import cpu_model
from bench.replay import ReplayConfig, replay
from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.cluster.worker_config import MockConfig
from disagg.config import EngineConfig
from disagg.models.deployment import deployment_of
from disagg.options import add_options, from_options
from disagg.workload import loaders
from disagg.workload.metrics import SLO
from disagg.workload.record import TraceRequest, TraceScale, for_models

TRACES = {"chat": "mooncake_conversation_trace.jsonl", "code": "mooncake_synthetic_trace.jsonl"}
HASH_SPACE = 1 << 40  # hash ids of a trace's copy `k` are moved by k times this: no prefix is shared between copies


def _copies(trace: list[TraceRequest], k: int, first: int = 0) -> list[TraceRequest]:
    """`k` copies of `trace`, one after the other, that share no prefix with each other (nor with other copies'
    numbers): a phase replayed after another on the same cluster finds nothing cached from it."""
    span = max(r.timestamp_ms for r in trace) + 1.0
    return [
        dataclasses.replace(
            r, hash_ids=[h + (first + c) * HASH_SPACE for h in r.hash_ids], timestamp_ms=r.timestamp_ms + c * span
        )
        for c in range(k)
        for r in trace
    ]


@dataclass
class MultiModelOptions:
    workers: int = field(default=2, metadata={"help": "aggregated mock workers per model"})
    limit: int = field(default=100, metadata={"help": "requests of each model's trace"})
    rate: float = field(default=4.0, metadata={"help": "requests/s of both models together (Poisson)"})
    overload: float = field(default=4.0, metadata={"help": "the neighbour's rate, in multiples of its capacity"})
    block_tokens: int = field(default=16, metadata={"help": "tokens per trace hash_id"})
    max_output_tokens: int = field(default=64, metadata={"help": "cap on output tokens"})
    mock_time_scale: float = field(default=0.25, metadata={"help": "mock steps sleep the modelled time x this"})
    repeats: int = field(default=3, metadata={"help": "runs per arm (interleaved)"})
    out: str = field(default="", metadata={"help": "write the result JSON here"})


def _service(models: list[str], opts: MultiModelOptions, name_prefix: str = "") -> Service:
    entries = [{"id": m, "prefill": 0, "decode": opts.workers} for m in models]
    deployment = deployment_of({"models": entries}, base=EngineConfig(num_threads=1, max_model_len=4096))
    cluster = ClusterConfig(tiers=None, mock=MockConfig(time_scale=opts.mock_time_scale))
    return Service(cluster, RouterConfig(), deployment=deployment, name_prefix=name_prefix)


def _run(service: Service, trace: list[TraceRequest], rate: float, opts: MultiModelOptions, seed: int) -> Any:
    scale = TraceScale(block_tokens=opts.block_tokens, max_output_tokens=opts.max_output_tokens)
    cfg = ReplayConfig(url=service.url, scale=scale, arrival="poisson", rate=rate, progress=False, seed=seed)
    return replay(trace, cfg)


def _figures(result: Any, slo: SLO) -> dict[str, Any]:
    m = result.metrics(slo)
    keep = (
        "request_goodput",
        "goodput_fraction",
        "request_throughput",
        "completed",
        "failed",
        "p99_ttft_ms",
        "median_ttft_ms",
    )
    out = {k: m[k] for k in keep}
    out["good"] = round(m["goodput_fraction"] * m["num_prompts"])  # requests that met both SLOs
    out["models"] = {name: {k: mm[k] for k in keep} for name, mm in (m.get("models") or {}).items()}
    return out


async def _side_by_side(
    services: dict[str, Service],
    traces: dict[str, list[TraceRequest]],
    rate: float,
    opts: MultiModelOptions,
    seed: int,
) -> list[Any]:
    """Each model's trace as its own Poisson stream (its own seed) to its service, all at once."""
    streams = [
        _run(services[m], for_models({m: t}), rate, opts, seed * len(traces) + i)
        for i, (m, t) in enumerate(traces.items())
    ]
    return await asyncio.gather(*streams)


def shared_vs_separate(traces: dict[str, list[TraceRequest]], opts: MultiModelOptions, seed: int) -> dict:
    """The same requests, each model's as its own Poisson stream at --rate / 2 (one client, both streams at once),
    against one router serving both models, then against one cluster per model side by side (the same machine
    load).  Goodput compared as requests meeting both SLOs."""
    slo = SLO()
    shared_service = _service(list(traces), opts)
    try:
        services = {m: shared_service for m in traces}
        shared = asyncio.run(_side_by_side(services, traces, opts.rate / len(traces), opts, seed))
    finally:
        shared_service.shutdown()
    services = {m: _service([m], opts, name_prefix=f"{m}-") for m in traces}
    try:
        separate = asyncio.run(_side_by_side(services, traces, opts.rate / len(traces), opts, seed))
    finally:
        for service in services.values():
            service.shutdown()
    arms = {"shared": dict(zip(traces, shared)), "separate": dict(zip(traces, separate))}
    figures = {arm: {m: _figures(r, slo) for m, r in results.items()} for arm, results in arms.items()}
    good = {arm: sum(f["good"] for f in per_model.values()) for arm, per_model in figures.items()}
    return {**figures, "good": good, "ratio": good["shared"] / max(good["separate"], 1)}


async def _neighbour_run(
    service: Service,
    quiet: list[TraceRequest],
    loud: list[TraceRequest] | None,
    rates: tuple[float, float],
    opts: MultiModelOptions,
    seed: int,
) -> list[Any]:
    runs = [_run(service, quiet, rates[0], opts, seed)]
    if loud is not None:
        runs.append(_run(service, loud, rates[1], opts, seed + 1))
    return await asyncio.gather(*runs)


def neighbour(traces: dict[str, list[TraceRequest]], opts: MultiModelOptions, seed: int) -> dict:
    (quiet_model, quiet_trace), (loud_model, loud_trace) = traces.items()
    slo = SLO()
    service = _service(list(traces), opts)
    try:
        burst = for_models({loud_model: _copies(loud_trace[:60], 1, first=1)})
        capacity = asyncio.run(_run(service, burst, 1000.0, opts, seed)).metrics(slo)["request_throughput"]
        quiet = [for_models({quiet_model: _copies(quiet_trace, 1, first=c)}) for c in (2, 3)]
        alone = asyncio.run(_neighbour_run(service, quiet[0], None, (opts.rate / 2, 0.0), opts, seed))[0]
        rates = (opts.rate / 2, opts.overload * capacity)
        seconds = len(quiet_trace) / rates[0]  # the neighbour is sent for as long as the quiet model's run
        loud = for_models({loud_model: _copies(loud_trace, max(1, round(rates[1] * seconds / len(loud_trace))), 4)})
        both = asyncio.run(_neighbour_run(service, quiet[1], loud, rates, opts, seed))
    finally:
        service.shutdown()
    a, b = _figures(alone, slo), _figures(both[0], slo)
    return {
        "quiet": quiet_model,
        "loud": loud_model,
        "loud_capacity_rps": capacity,
        "loud_rate_rps": rates[1],
        "alone": a,
        "with_neighbour": b,
        "loud_figures": _figures(both[1], slo),
        "p99_ttft_ratio": b["p99_ttft_ms"] / a["p99_ttft_ms"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.multi_model", description=__doc__.splitlines()[0])
    add_options(p, MultiModelOptions)
    opts = from_options(MultiModelOptions, p.parse_args(argv))
    traces = {m: loaders.load(name, opts.limit) for m, name in TRACES.items()}
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    runs: list[dict] = []
    try:
        for i in range(opts.repeats):
            run = {"sharing": shared_vs_separate(traces, opts, seed=i), "neighbour": neighbour(traces, opts, seed=i)}
            runs.append(run)
            print({"ratio": run["sharing"]["ratio"], "p99_ttft_ratio": run["neighbour"]["p99_ttft_ratio"]}, flush=True)
    finally:
        ray.shutdown()
    ratios = [r["sharing"]["ratio"] for r in runs]
    ttft = [r["neighbour"]["p99_ttft_ratio"] for r in runs]
    rows = [
        {"goal": "two models on one router / two clusters, goodput", "median (range)": median_range(ratios)},
        {
            "goal": "quiet model's TTFT p99, with / without a 4x-overloaded neighbour",
            "median (range)": median_range(ttft),
        },
    ]
    print_table(rows, f"several models: {opts.workers} mock workers per model, {opts.rate} req/s in all")
    emit({"options": dataclasses.asdict(opts), "cpu": cpu_model(), "runs": runs}, opts.out or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
