"""Demand shift: the fleet planner against every static split of the same workers (issue: several models, goal 2),
on real Ray clusters over HTTP with mock workers (cluster/mocker.py: each step sleeps the step-time model's time, so
the workers' capacity is theirs, not the 2 cores').

Two models, `a` and `b`, each with --per-model workers started (the same processes in every arm); --budget of them
are awake in all, the rest parked asleep (a deployment's `standby`).  Workload: the Mooncake conversation trace's
requests (sessions dropped: each request stands alone; hash ids moved apart per model), as two Poisson streams:
for --phase-s seconds `a` is sent at --hot times one worker's capacity and `b` at --cold times it, then the two flip.
One worker's capacity is measured first, with a saturating burst on a model with one awake worker.

  static a+b   the split `a` awake / `b` awake, fixed (fleet planner off), for every split of --budget
  planner      starts from the even split; the fleet planner moves workers between the models from demand
Goodput is compared as requests meeting both SLOs (TTFT and TPOT): every arm gets the same requests at the same
times.  Arms interleaved, --repeats times; the ratio of each repeat is planner / the best static split of that
repeat; medians with their range.

    .venv/bin/python -m bench.demand_shift --out bench/results/demand_shift.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import ray

from bench.common import emit, median_range, planner_verdict, print_table
from bench.dynamo_router import cpu_model
from bench.replay import ReplayConfig, ReplayResult, replay
from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.cluster.worker_config import MockConfig
from disagg.config import EngineConfig
from disagg.models.deployment import deployment_of
from disagg.options import add_options, from_options
from disagg.planner.fleet import FleetConfig
from disagg.router.admission import CapacityConfig
from disagg.workload import loaders
from disagg.workload.metrics import SLO
from disagg.workload.record import TraceRequest, TraceScale, for_models

TRACE = "mooncake_conversation_trace.jsonl"
HASH_SPACE = 1 << 40  # each model's (and the burst's) hash ids are moved by a multiple of this: nothing shared
MODELS = ("a", "b")


@dataclass
class DemandShiftOptions:
    per_model: int = field(default=3, metadata={"help": "mock workers started per model"})
    budget: int = field(default=4, metadata={"help": "workers awake across both models"})
    phase_s: float = field(default=40.0, metadata={"help": "seconds before the hot model flips"})
    hot: float = field(default=2.5, metadata={"help": "the hot model's rate, in workers' capacity"})
    cold: float = field(default=0.5, metadata={"help": "the other model's rate, in workers' capacity"})
    max_running: int = field(default=8, metadata={"help": "admission: requests per worker"})
    block_tokens: int = field(default=16, metadata={"help": "tokens per trace hash_id"})
    max_output_tokens: int = field(default=64, metadata={"help": "cap on output tokens"})
    mock_time_scale: float = field(default=0.25, metadata={"help": "mock steps sleep the modelled time x this"})
    repeats: int = field(default=3, metadata={"help": "runs per arm (interleaved)"})
    arms: str = field(default="", metadata={"help": "comma-separated arms to run (e.g. planner,3+1); empty: all"})
    out: str = field(default="", metadata={"help": "write the result JSON here"})


def _service(awake: dict[str, int], opts: DemandShiftOptions, fleet: bool) -> Service:
    entries = [{"id": m, "prefill": 0, "decode": awake[m], "standby": opts.per_model - awake[m]} for m in MODELS]
    deployment = deployment_of({"models": entries}, base=EngineConfig(num_threads=1, max_model_len=4096))
    cluster = ClusterConfig(tiers=None, mock=MockConfig(time_scale=opts.mock_time_scale))
    router = RouterConfig(
        capacity=CapacityConfig(max_running=opts.max_running),
        fleet=FleetConfig(enabled=fleet),
    )
    return Service(cluster, router, deployment=deployment)


def _stream(pool: list[TraceRequest], rates: tuple[float, float], phase_s: float, rng: random.Random, space: int):
    """Poisson arrivals at rates[0] for phase_s seconds, then rates[1] for as long; requests drawn from `pool` in
    order (cycling, each cycle in a hash space of its own)."""
    out, t, i = [], 0.0, 0
    for phase, rate in enumerate(rates):
        end = (phase + 1) * phase_s
        while True:
            t += rng.expovariate(rate)
            if t >= end:  # memoryless: the next phase's first arrival is drawn from its own start
                t = end
                break
            r = pool[i % len(pool)]
            shift = (space + i // len(pool)) * HASH_SPACE
            out.append(
                dataclasses.replace(
                    r, timestamp_ms=t * 1000, hash_ids=[h + shift for h in r.hash_ids], session_id=None, turn=None
                )
            )
            i += 1
    return out


def _replay(service: Service, trace: list[TraceRequest], opts: DemandShiftOptions, **kw: Any) -> ReplayResult:
    scale = TraceScale(block_tokens=opts.block_tokens, max_output_tokens=opts.max_output_tokens)
    cfg = ReplayConfig(url=service.url, scale=scale, progress=False, **kw)
    return asyncio.run(replay(trace, cfg))


def capacity(pool: list[TraceRequest], opts: DemandShiftOptions) -> float:
    """Requests/s one awake worker completes under a saturating burst."""
    service = _service({"a": 1, "b": 1}, opts, fleet=False)
    try:
        burst = [dataclasses.replace(r, session_id=None, turn=None) for r in pool[:80]]
        result = _replay(service, for_models({"a": burst}), opts, arrival="poisson", rate=1000.0)
    finally:
        service.shutdown()
    return result.metrics(SLO())["request_throughput"]


async def _watch(url: str, stop: asyncio.Event, t0: float) -> list[dict[str, Any]]:
    """The fleet's awake workers per model, every second (the planner arm's timeline)."""
    samples = []
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while not stop.is_set():
            status = (await client.get("/admin/fleet")).json()
            models = status.get("models", {})
            awake = {m: len(v["awake"]) for m, v in models.items()}
            demand = {m: (v["demand"], v["expected"], v["queued"]) for m, v in models.items()}
            sample = {"t": round(time.monotonic() - t0, 1), "awake": awake, "hold": status.get("last_hold")}
            samples.append({**sample, "demand": demand})
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    return samples


async def _run_watched(service: Service, trace: list[TraceRequest], opts: DemandShiftOptions) -> tuple[Any, list]:
    scale = TraceScale(block_tokens=opts.block_tokens, max_output_tokens=opts.max_output_tokens)
    stop, t0 = asyncio.Event(), time.monotonic()
    watcher = asyncio.create_task(_watch(service.url, stop, t0))
    try:
        result = await replay(trace, ReplayConfig(url=service.url, scale=scale, progress=False))
    finally:
        stop.set()
    return result, await watcher


def _figures(result: ReplayResult, slo: SLO) -> dict[str, Any]:
    m = result.metrics(slo)
    keep = ("goodput_fraction", "completed", "failed", "p99_ttft_ms", "median_ttft_ms")
    return {
        **{k: m[k] for k in keep},
        "good": round(m["goodput_fraction"] * m["num_prompts"]),
        "models": {name: {k: mm[k] for k in keep} for name, mm in (m.get("models") or {}).items()},
    }


def one_repeat(trace: list[TraceRequest], opts: DemandShiftOptions, order: list[str]) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for arm in order:
        if arm == "planner":
            half = opts.budget // 2
            service = _service({"a": half, "b": opts.budget - half}, opts, fleet=True)
        else:
            a = int(arm.split("+")[0])
            service = _service({"a": a, "b": opts.budget - a}, opts, fleet=False)
        try:
            result, timeline = asyncio.run(_run_watched(service, trace, opts))
            if arm == "planner":
                fleet = httpx.get(f"{service.url}/admin/fleet").json()
        finally:
            service.shutdown()
        arms[arm] = _figures(result, SLO())
        if arm == "planner":  # each move's start and length in the trace's time (the hot model flips at phase_s)
            recent = [{**m, "at": round(m["at"] - result.started_at, 2)} for m in fleet["recent"]]
            arms[arm].update(timeline=timeline, moves=recent, failed_moves=fleet["failed_moves"])
        print(arm, {k: arms[arm][k] for k in ("good", "completed", "failed")}, flush=True)
    return planner_verdict(arms)  # a partial run (--arms): no ratio


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.demand_shift", description=__doc__.splitlines()[0])
    add_options(p, DemandShiftOptions)
    opts = from_options(DemandShiftOptions, p.parse_args(argv))
    pool = loaders.load(TRACE)
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    runs: list[dict] = []
    try:
        per_worker = capacity(pool, opts)
        rates = (opts.hot * per_worker, opts.cold * per_worker)
        rng = random.Random(0)
        trace = for_models(
            {
                "a": _stream(pool, rates, opts.phase_s, rng, space=1),
                "b": _stream(pool, rates[::-1], opts.phase_s, rng, space=1000),
            }
        )
        arms = [f"{a}+{opts.budget - a}" for a in range(1, opts.budget)] + ["planner"]
        arms = [a for a in arms if not opts.arms or a in opts.arms.split(",")]
        for i in range(opts.repeats):
            order = arms[i % len(arms) :] + arms[: i % len(arms)]  # interleaved: each repeat starts elsewhere
            runs.append(one_repeat(trace, opts, order))
            print({"ratio": runs[-1]["ratio"], "best_static": runs[-1]["best_static"]}, flush=True)
    finally:
        ray.shutdown()
    ratios = [r["ratio"] for r in runs if r["ratio"] is not None] or [0.0]
    rows = [
        {
            "goal": "fleet planner / best static split, requests meeting both SLOs",
            "median (range)": median_range(ratios),
        }
    ]
    print_table(rows, f"demand shift: {opts.budget} awake of {2 * opts.per_model} mock workers, two models")
    result = {"options": dataclasses.asdict(opts), "cpu": cpu_model(), "capacity_rps_per_worker": per_worker}
    emit({**result, "requests": len(trace), "runs": runs}, opts.out or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
