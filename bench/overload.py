"""`disagg bench overload`: what admission control does under overload, on a real cluster.

1. capacity: the completion rate of the cluster when saturated (admission on), in requests/s of one fixed shape;
2. sweep: Poisson arrivals at 0.5x-4x that capacity, with admission control (the router queues, sheds with 429
   when a request cannot start within its deadline = the TTFT SLO) and without it (every request dispatched at
   once; the workers queue everything): goodput under the SLOs in req/s, 429s and how fast they come back.
   Each arm runs --repeats times on a fresh cluster, the arms interleaved; medians with their range, and both
   arms divided by one reference (the no-admission arm's peak, same run);
3. tenants: two tenants of equal weight, one sending 10x the other's requests, 2x capacity in total: tokens
   served to each against their max-min fair allocation (Jain's index) and the light tenant's TTFT p99 against
   its unloaded p99;
4. priority: 10% of the traffic at priority 10 while the rest (priority 0) brings the total to 2x capacity:
   the urgent requests' TTFT p99 against unloaded;
5. (simulator only) rescore: prompts sharing prefixes at 2x capacity, a queued request routed when it leaves
   the queue vs when it arrives: prefix-cache hit ratio and goodput.

    disagg bench overload --decode 2 --duration 30 --out bench/results/overload
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.sweeps import ARMS, aggregate_sweeps, rescore_study
from disagg.config import LAB_KV_CACHE_MB, EngineConfig
from disagg.model_store import DEFAULT_VOCAB_SIZE
from disagg.options import add_options
from disagg.router.admission import AdmissionConfig, CapacityConfig, jain_index
from disagg.router.policy import PolicyConfig, PolicyKind
from disagg.utils import cdiv
from disagg.workload.metrics import SLO, percentile


@dataclass
class OverloadOptions:
    """The study's settings (the model comes from EngineConfig). The admission limits are this study's, sized for
    its SLOs on a 2-core machine, not the product's CapacityConfig / AdmissionConfig defaults."""

    prefill: int = field(default=0, metadata={"help": "prefill workers (0: aggregated)"})
    decode: int = field(default=2, metadata={"help": "decode (or aggregated) workers"})
    duration: float = field(default=30.0, metadata={"help": "seconds of arrivals per run"})
    loads: str = field(default="0.5,1,2,4", metadata={"help": "multiples of the measured capacity"})
    saturate_rate: float = field(default=20.0, metadata={"help": "arrivals/s used to measure capacity"})
    prompt_tokens: int = field(default=200, metadata={"help": "prompt tokens per request"})
    output_tokens: int = field(default=16, metadata={"help": "output tokens per request"})
    max_running: int = field(default=8, metadata={"help": "admission: in-flight requests per worker"})
    max_prefill_queue_tokens: int = field(default=400, metadata={"help": "admission: queued prompt tokens per worker"})
    queue_deadline_s: float = field(
        default=1.0,
        metadata={
            "help": "admission: a request that cannot start within this is refused (the TTFT SLO minus "
            "the time a prefill takes, so admitted requests can still meet it)"
        },
    )
    slo_ttft_s: float = field(default=SLO.ttft_ms / 1000, metadata={"help": "the product's TTFT SLO, s"})
    # looser than the product's TPOT SLO: overloaded CPU workers decode slowly, and the study judges admission
    slo_tpot_s: float = field(default=0.5, metadata={"help": "TPOT SLO, s (looser than the product's)"})
    simulate: int = field(
        default=0,
        metadata={"help": "run the same study in the simulator with this many decode workers (0: real cluster)"},
    )
    time_model: str | None = field(
        default=None, metadata={"help": "simulator step-time model (disagg bench calibrate)"}
    )
    prefixes: int = field(
        default=0, metadata={"help": "simulator rescore study: shared prefixes (0: 4 per decode worker)"}
    )
    shared_blocks: int = field(default=8, metadata={"help": "16-token blocks each shared prefix spans"})
    repeats: int = field(
        default=3,
        metadata={"help": "passes of each sweep arm (fresh cluster each, arms interleaved); medians with range"},
    )
    out: str = field(default="bench/results/overload", metadata={"help": "output directory"})


@dataclass
class Shot:
    tenant: str
    priority: int
    start: float
    status: int = 0  # 200, 429, ... (0: transport error)
    answered_s: float | None = None  # headers back (a 429's latency)
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    reject_code: str = ""  # the 429's error code: queue_full / shed / deadline (on arrival) / expired (queued)


async def _shot(client: httpx.AsyncClient, model: str, shot: Shot, prompt: list[int], max_tokens: int) -> Shot:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "priority": shot.priority,
    }
    headers = {"X-Tenant-ID": shot.tenant}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            shot.status, shot.answered_s = r.status_code, time.perf_counter() - t0
            if r.status_code != 200:
                await r.aread()
                if r.status_code == 429:
                    shot.reject_code = r.json()["error"].get("code") or ""
                return shot
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    shot.status = 599
                    return shot
                if data["choices"] and data["choices"][0]["text"]:
                    shot.tokens += 1
                    if shot.ttft_s is None:
                        shot.ttft_s = time.perf_counter() - t0
        shot.prompt_tokens = len(prompt)
        shot.e2e_s = time.perf_counter() - t0
    except httpx.HTTPError:
        shot.status = 0
    return shot


def _poisson(rng: random.Random, rate: float, duration_s: float) -> Iterator[float]:
    """Arrival times of a Poisson process of `rate` per second within [0, duration_s)."""
    t = rng.expovariate(rate)
    while t < duration_s:
        yield t
        t += rng.expovariate(rate)


async def open_loop(
    url: str,
    model: str,
    streams: list[tuple[str, int, float]],
    duration_s: float,
    prompt_tokens: int,
    max_tokens: int,
    seed: int = 0,
) -> list[Shot]:
    """Poisson arrivals for each (tenant, priority, rate) stream over `duration_s`; every prompt distinct."""
    rng = random.Random(seed)
    plan: list[tuple[float, str, int]] = []
    for tenant, priority, rate in streams:
        plan += [(t, tenant, priority) for t in _poisson(rng, rate, duration_s)]
    plan.sort()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0, connect=30.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def fire(i: int, at: float, tenant: str, priority: int) -> Shot:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            prompt = [(7919 * i + 31 * j + seed) % 40000 + 300 for j in range(prompt_tokens)]
            return await _shot(client, model, Shot(tenant, priority, at), prompt, max_tokens)

        return list(await asyncio.gather(*(fire(i, at, t, p) for i, (at, t, p) in enumerate(plan))))


def summarize(shots: list[Shot], arrivals_s: float, ttft_slo: float, tpot_slo: float) -> dict[str, Any]:
    """Goodput and throughput per second of the whole run: from the first arrival to the last answer (a
    backlog that outlives the arrivals counts against the rate)."""
    ends = [s.start + (s.e2e_s if s.e2e_s is not None else (s.answered_s or 0.0)) for s in shots]
    duration_s = max([arrivals_s, *ends])
    ok = [s for s in shots if s.status == 200 and s.e2e_s is not None]
    # (e2e_s, ttft_s) of the completed ones: every completed stream has both
    times = [(s, s.e2e_s, s.ttft_s) for s in ok if s.e2e_s is not None and s.ttft_s is not None]
    good = [
        s for s, e2e, ttft in times if ttft <= ttft_slo and (s.tokens < 2 or (e2e - ttft) / (s.tokens - 1) <= tpot_slo)
    ]
    refused = [s for s in shots if s.status == 429]
    return {
        "sent": len(shots),
        "completed": len(ok),
        "rejected_429": len(refused),
        "duration_s": duration_s,
        "failed_other": len(shots) - len(ok) - len(refused),
        "goodput": len(good) / duration_s,
        "throughput": len(ok) / duration_s,
        "ttft_p50_ms": percentile([ttft for _, _, ttft in times], 50) * 1000,
        "ttft_p99_ms": percentile([ttft for _, _, ttft in times], 99) * 1000,
        "tpot_p99_ms": percentile([(e2e - ttft) / (s.tokens - 1) for s, e2e, ttft in times if s.tokens > 1], 99) * 1000,
        "met_ttft": sum(s.ttft_s is not None and s.ttft_s <= ttft_slo for s in ok),
        "reject_p50_ms": percentile([s.answered_s for s in refused if s.answered_s is not None], 50) * 1000,
        "reject_p99_ms": percentile([s.answered_s for s in refused if s.answered_s is not None], 99) * 1000,
        **_reject_split(refused),
    }


def _reject_split(refused: list[Shot]) -> dict[str, Any]:
    """429s refused on arrival (queue full, or the wait estimate past the deadline) come back at once; those
    that waited in the queue (shed by a higher band, or still queued at their deadline) come back later."""
    waited = {"shed", "expired"}
    answered = [(s, s.answered_s) for s in refused if s.answered_s is not None]  # a 429 always has its headers
    arrival = [t for s, t in answered if s.reject_code not in waited]
    queued = [t for s, t in answered if s.reject_code in waited]
    return {
        "rejected_on_arrival": len(arrival),
        "rejected_while_queued": len(queued),
        "reject_on_arrival_p99_ms": percentile(arrival, 99) * 1000,
        "reject_while_queued_p50_ms": percentile(queued, 50) * 1000,
    }


def _service(args: argparse.Namespace, admission: bool):
    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.config import EngineConfig
    from disagg.model_store import default_model_dir

    engine = EngineConfig(
        model=args.model or str(default_model_dir()), kv_cache_memory_mb=LAB_KV_CACHE_MB, num_threads=1
    )
    router = RouterConfig()
    if admission:  # queue deadline = the TTFT SLO; saturation thresholds sized for the SLOs on this machine
        router.admission = AdmissionConfig(default_deadline_s=args.queue_deadline_s)
        router.capacity = CapacityConfig(
            max_running=args.max_running, max_prefill_queue_tokens=args.max_prefill_queue_tokens
        )
    else:  # the old behaviour: dispatch everything at once, workers queue without bound
        router.admission = AdmissionConfig(
            max_queued_requests=10**9, max_queued_tokens=10**12, default_deadline_s=3600, max_deadline_s=3600
        )
        router.capacity = CapacityConfig(max_running=10**9, max_prefill_queue_tokens=10**12, max_kv_fraction=1e9)
    return Service(ClusterConfig(num_prefill=args.prefill, num_decode=args.decode, engine=engine), router)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from bench.compare import _warm

    out: dict[str, Any] = {"settings": vars(args)}
    model = None
    slo = (args.slo_ttft_s, args.slo_tpot_s)
    try:
        svc = _service(args, admission=True)
        _warm(svc.url, DEFAULT_VOCAB_SIZE, args.prefill + args.decode)
        model = httpx.get(f"{svc.url}/v1/models").json()["data"][0]["id"]

        after: dict[str, Any] = {}
        out["router_after_phase"] = after

        def go(streams, duration, seed=0):
            shots = asyncio.run(
                open_loop(svc.url, model, streams, duration, args.prompt_tokens, args.output_tokens, seed)
            )
            key = f"{len(after)}:{streams[0][0]}"
            after[key] = _router_state(svc)  # restarts or leftovers would skew the later phases
            print(f"[overload] router after {key}: {after[key]}", flush=True)
            return shots

        # unloaded: one stream at a tenth of a guess, to know the no-queue TTFT
        unloaded = go([("light", 0, 0.2), ("urgent", 10, 0.2)], args.duration / 2)
        base = {
            t: percentile([s.ttft_s for s in unloaded if s.tenant == t and s.ttft_s is not None], 99) * 1000
            for t in ("light", "urgent")
        }
        # capacity: the completion rate when far over-subscribed (admission keeps the workers at their limit)
        sat = go([("default", 0, args.saturate_rate)], args.duration)
        capacity = summarize(sat, args.duration, *slo)["throughput"]
        out["unloaded_ttft_p99_ms"], out["capacity_req_s"] = base, capacity
        print(f"[overload] capacity {capacity:.2f} req/s; unloaded TTFT p99 {base}", flush=True)
        # tenants: heavy sends 10x the light tenant's requests, 2x capacity in total
        light_rate = 2 * capacity / 11
        shots = go([("heavy", 0, 10 * light_rate), ("light", 0, light_rate)], args.duration, seed=1)
        out["tenants"] = tenant_fairness(shots, args.prompt_tokens + args.output_tokens, base["light"])
        print(f"[overload] tenants {out['tenants']}", flush=True)
        # priority: 10% urgent, background bringing the total to 2x
        shots = go([("bg", 0, 1.8 * capacity), ("urgent", 10, 0.2 * capacity)], args.duration, seed=2)
        urgent = [s for s in shots if s.tenant == "urgent"]
        out["priority"] = {
            "urgent": summarize(urgent, args.duration, *slo),
            "background": summarize([s for s in shots if s.tenant == "bg"], args.duration, *slo),
            "urgent_ttft_p99_over_unloaded": percentile([s.ttft_s for s in urgent if s.ttft_s is not None], 99)
            * 1000
            / base["urgent"],
        }
        print(f"[overload] priority {out['priority']}", flush=True)
        svc.shutdown()
        out["sweep"] = interleaved_sweeps(args, capacity, slo, model)
    finally:
        ray.shutdown()
    return out


def _router_state(svc) -> dict[str, Any]:
    import ray

    health = ray.get(svc.router.health.remote())
    return {
        "states": {n: w["state"] for n, w in health["workers"].items()},
        "restarts": sum(w["restarts"] for w in health["workers"].values()),
        "busy": {n: load for n, load in health["loads"].items() if any(load.values())},
    }


def sweep(
    go, capacity: float, args: argparse.Namespace, slo: tuple[float, float], seed: int = 0
) -> list[dict[str, Any]]:
    """One pass over the loads: absolute goodput (req/s) per load."""
    rows = []
    for load in (float(x) for x in args.loads.split(",")):
        shots = go([("default", 0, load * capacity)], args.duration, seed=seed * 1000 + int(load * 10))
        row = {"load": load, **summarize(shots, args.duration, *slo)}
        print(f"[overload] load {load}x: {row}", flush=True)
        rows.append(row)
    return rows


def interleaved_sweeps(
    args: argparse.Namespace, capacity: float, slo: tuple[float, float], model: str
) -> dict[str, Any]:
    """Both arms, `args.repeats` times, interleaved (the arm that goes first alternates), each pass on a fresh
    cluster, so neither arm inherits the other's caches, queues or warm-up."""
    from bench.compare import _warm

    runs: dict[str, list[list[dict[str, Any]]]] = {arm: [] for arm in ARMS}
    for rep in range(args.repeats):
        for arm in ARMS if rep % 2 == 0 else ARMS[::-1]:
            svc = _service(args, admission=arm == "admission")
            try:
                _warm(svc.url, DEFAULT_VOCAB_SIZE, args.prefill + args.decode)
                print(f"[overload] sweep {arm}, repeat {rep + 1}/{args.repeats}", flush=True)
                runs[arm].append(
                    sweep(
                        lambda streams, duration, seed=0, url=svc.url: asyncio.run(
                            open_loop(url, model, streams, duration, args.prompt_tokens, args.output_tokens, seed)
                        ),
                        capacity,
                        args,
                        slo,
                        seed=rep,
                    )
                )
            finally:
                svc.shutdown()
    return aggregate_sweeps(runs)


def tenant_fairness(shots: list[Shot], per_request_tokens: int, light_base_ms: float) -> dict[str, Any]:
    """Tokens served per tenant against their max-min fair allocation of what was served (equal weights: the
    light tenant, asking for less than half, is owed all it asked for; the heavy one the rest)."""
    served = {
        t: sum(s.prompt_tokens + s.tokens for s in shots if s.tenant == t and s.status == 200)
        for t in ("heavy", "light")
    }
    sent = {t: sum(1 for s in shots if s.tenant == t) for t in ("heavy", "light")}
    total = sum(served.values()) or 1
    owed_light = min(sent["light"] * per_request_tokens, total / 2)
    fair = {"light": owed_light / total, "heavy": 1 - owed_light / total}
    share = {t: served[t] / total for t in served}
    light = [s for s in shots if s.tenant == "light"]
    p99 = percentile([s.ttft_s for s in light if s.ttft_s is not None], 99) * 1000
    return {
        "sent": sent,
        "served_tokens": served,
        "share": share,
        "fair_share": fair,
        "share_error": {t: share[t] / fair[t] - 1 for t in share},
        "jain_index_vs_fair": jain_index([share[t] / fair[t] for t in share]),
        "light_completed": sum(s.status == 200 for s in light),
        "light_rejected": sum(s.status == 429 for s in light),
        "light_ttft_p99_ms": p99,
        "light_ttft_p99_over_unloaded": p99 / light_base_ms,
    }


# ---------------------------------------------------------------------- the same study in the simulator
def _synthetic(
    streams: list[tuple[str, int, float]],
    duration_s: float,
    prompt_tokens: int,
    output_tokens: int,
    seed: int,
    prefixes: int = 0,
    shared_blocks: int = 0,
) -> list:
    """Poisson arrivals of one request shape as a trace (16-token hash blocks).  prefixes=0: every prompt
    distinct; else each prompt starts with one of `prefixes` shared prefixes of `shared_blocks` blocks (documents,
    system prompts) and ends with its own blocks, so where a request is routed decides its cache hits."""
    from disagg.workload.record import TraceRequest

    rng = random.Random(seed)
    out = []
    blocks = cdiv(prompt_tokens, EngineConfig.block_size)
    unique = itertools.count(1 << 30)
    for tenant, priority, rate in streams:
        for t in _poisson(rng, rate, duration_s):  # lazily: the prefix draws interleave with the arrival draws
            hash_ids: list[int] = []
            if prefixes:
                group = rng.randrange(prefixes)
                hash_ids = [group * shared_blocks + j for j in range(shared_blocks)] + [
                    next(unique) for _ in range(blocks - shared_blocks)
                ]
            out.append(
                TraceRequest(
                    t * 1000, prompt_tokens, output_tokens, hash_ids=hash_ids, tenant=tenant, priority=priority
                )
            )
    return sorted(out, key=lambda r: r.timestamp_ms)


def _sim_summary(records, trace, duration_s: float, slo) -> list[Shot]:
    shots = []
    for r, req in zip(records, trace):
        status = 200 if r.ok else (429 if (r.error or "").startswith("HTTP 429") else 0)
        shots.append(
            Shot(
                req.tenant or "default",
                req.priority,
                r.start_s,
                status,
                r.refused_s or 0.0,
                r.ttft_s,
                r.e2e_s,
                r.output_tokens,
                r.prompt_tokens,
                r.refusal_code or "",
            )
        )
    return shots


def run_sim(args: argparse.Namespace) -> dict[str, Any]:
    from disagg.sim.cluster import SimClusterConfig
    from disagg.sim.run import simulate
    from disagg.sim.timemodel import StepTimeModel
    from disagg.workload.record import TraceScale

    model = StepTimeModel.load(args.time_model) if args.time_model else StepTimeModel()
    scale = TraceScale(block_tokens=EngineConfig.block_size, native_block=EngineConfig.block_size)  # lengths as given
    slo = (args.slo_ttft_s, args.slo_tpot_s)

    def go(streams, duration, admission=True, seed=0, rescore=True, prefixes=0, stats=None):
        trace = _synthetic(
            streams, duration, args.prompt_tokens, args.output_tokens, seed, prefixes, args.shared_blocks
        )
        cfg = SimClusterConfig(
            num_prefill=args.prefill * args.simulate // 2,
            num_decode=args.simulate,
            num_blocks=364,
            policy=PolicyConfig(kind=PolicyKind.KV, seed=0),
            admission=AdmissionConfig(default_deadline_s=args.queue_deadline_s) if admission else None,
            capacity=CapacityConfig(
                max_running=args.max_running, max_prefill_queue_tokens=args.max_prefill_queue_tokens
            ),
            rescore_on_dispatch=rescore,
        )
        result = simulate(trace, scale, cfg, model)
        if stats is not None:
            stats.update(result.prefix_cache)
        return _sim_summary(result.records, trace, duration, slo)

    out: dict[str, Any] = {"settings": vars(args)}
    unloaded = go([("light", 0, 0.1 * args.simulate), ("urgent", 10, 0.1 * args.simulate)], args.duration)
    base = {
        t: percentile([s.ttft_s for s in unloaded if s.tenant == t and s.ttft_s is not None], 99) * 1000
        for t in ("light", "urgent")
    }
    capacity = summarize(go([("default", 0, args.saturate_rate * args.simulate)], args.duration), args.duration, *slo)[
        "throughput"
    ]
    out["unloaded_ttft_p99_ms"], out["capacity_req_s"] = base, capacity
    light_rate = 2 * capacity / 11
    shots = go([("heavy", 0, 10 * light_rate), ("light", 0, light_rate)], args.duration, seed=1)
    out["tenants"] = tenant_fairness(shots, args.prompt_tokens + args.output_tokens, base["light"])
    shots = go([("bg", 0, 1.8 * capacity), ("urgent", 10, 0.2 * capacity)], args.duration, seed=2)
    urgent = [s for s in shots if s.tenant == "urgent"]
    out["priority"] = {
        "urgent": summarize(urgent, args.duration, *slo),
        "urgent_ttft_p99_over_unloaded": percentile([s.ttft_s for s in urgent if s.ttft_s is not None], 99)
        * 1000
        / base["urgent"],
    }
    runs: dict[str, list[list[dict[str, Any]]]] = {arm: [] for arm in ARMS}
    for rep in range(args.repeats):  # a fresh simulated cluster every pass; seeds differ per repeat
        for arm in ARMS if rep % 2 == 0 else ARMS[::-1]:
            runs[arm].append(
                sweep(
                    lambda streams, duration, seed=0, arm=arm: go(streams, duration, arm == "admission", seed=seed),
                    capacity,
                    args,
                    slo,
                    seed=rep,
                )
            )
    out["sweep"] = aggregate_sweeps(runs)
    out["rescore"] = rescore_study(go, capacity, args, slo)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg bench overload", description=__doc__.splitlines()[0])
    add_options(parser, OverloadOptions)
    add_options(parser, EngineConfig, only=("model",))
    args = parser.parse_args(argv)
    result = run_sim(args) if args.simulate else run(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
