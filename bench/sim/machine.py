"""Measure what this machine adds to the engine's calibrated step times when a whole cluster shares it, so the
simulator can model it instead of fitting two constants to one real run (bench/sim/validate.py --fit).

Four measurements, each of real processes on this machine:
1. Co-run slowdown: inside traced 2- and 4-worker clusters serving the agent workload, each engine step's model time
   against the calibrated prediction, by how many other workers computed over the step's span: beside one other
   against none, by the step's size (small decode steps pay most: the engines share the memory bus), and beside 2
   or 3 others against one.  The simulator multiplies a step by the factors of its size and of the workers busy
   beside it, over its span (processor sharing).
2. Request overhead: sequential tiny requests (8-token prompt, 1 output token) through the real HTTP endpoint of a
   2-worker cluster at idle; TTFT minus the engine's predicted step time is what the HTTP server, router, Ray RPCs
   and the client add to every request.
3. Serving CPU: CPU seconds of every process (router actor, the client, Ray's own daemons; engine workers apart):
   per request from the tiny requests, and per generated token from the rest while the agent workload runs on
   that cluster - the share of the cores the engines do not get.
4. Hand-off: on a real 1 prefill + 1 decode cluster, the fixed cost of the disaggregated path (prefill call back
   to the router, decode call, the NIXL read's set-up and notification) and its serving CPU, from remote-length
   prompts against local-length ones.

    .venv/bin/python -m bench.sim.machine --time-model bench/results/time_model.json --out bench/results/machine.json
    .venv/bin/python -m bench.sim.machine --parts handoff   # one part again; the others are kept from --out

Its JSON feeds `--machine-model` of the simulator (`bench simulate`, `disagg plan`, `bench.sim.validate`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.sim.calibrate import cpu_model
from disagg.config import LAB_KV_CACHE_MB, EngineConfig
from disagg.options import add_options, from_options
from disagg.sim.timemodel import StepTimeModel
from disagg.utils import cdiv

# the workers' engine settings everywhere below (bench/compare.py's defaults, as bench.sim.validate runs them)
KV_CACHE_MB, MAX_MODEL_LEN, MAX_BATCHED_TOKENS = (
    LAB_KV_CACHE_MB,
    EngineConfig.max_model_len,
    EngineConfig.max_num_batched_tokens,
)


@dataclass
class MachineOptions:
    time_model: str = field(
        default="bench/results/time_model.json", metadata={"help": "step-time model to predict with"}
    )
    requests: int = field(default=30, metadata={"help": "sequential tiny requests for the request overhead"})
    sessions: int = field(default=8, metadata={"help": "agent sessions of the cluster run"})
    session_rate: float = field(default=0.2, metadata={"help": "agent sessions per second"})
    parts: str = field(
        default="corun,cluster,handoff",
        metadata={"help": "which measurements to take; the others are kept from --out if it exists"},
    )
    out: str = field(default="bench/results/machine.json", metadata={"help": "JSON file the machine model goes to"})


def _local_engine(threads: int) -> Any:
    """An engine in this process, as bench/sim/calibrate.py builds it (its runner records the steps)."""
    from bench.sim.calibrate import _engine

    return _engine(
        argparse.Namespace(
            model="",
            threads=threads,
            kv_cache_memory_mb=KV_CACHE_MB,
            max_model_len=MAX_MODEL_LEN,
            max_num_batched_tokens=MAX_BATCHED_TOKENS,
        )
    )


def _prefill_step(model: StepTimeModel, tokens: int) -> float:
    """The predicted step of one request's whole `tokens`-long prompt."""
    return model.predict([1.0, float(tokens), 1.0, tokens * tokens / 1000])


# ---------------------------------------------------------------------- 1. co-run slowdown
# the clusters the co-run factors are measured in: what a step pays beside others depends on how many engines
# share the cores (idle ones included: they still answer heartbeats and poll), so each size is measured apart
# and the simulator takes the nearest one's (as many workers as the 2- and 4-worker configurations run here)
CORUN_CLUSTERS = ("agg-kv=0x2:kv", "agg-kv-4=0x4:kv")


def corun(model: StepTimeModel, sessions: int, session_rate: float) -> dict[str, Any]:
    """What a step pays while other workers compute, measured inside running clusters of each size in
    CORUN_CLUSTERS: the agent workload (a session per half worker), traced, and the ratio of its `engine.step`
    spans' model time to the calibrated prediction (bench/sim/steps.py) - beside one other worker over its span
    against none, by the step's size (decode steps read every weight for a few tokens and pay most: the engines
    share the memory bus), and with 2 or more others against one (waiting for a core costs more than the cores'
    share).  {"by_workers": {"2": {...}, "4": {...}}}."""
    from disagg.sim.spec import parse_configs

    out = {}
    for config in CORUN_CLUSTERS:
        workers = parse_configs(config)[0].workers
        scale = workers / 2  # sessions and their rate grow with the workers: steps with 2 and 3 others busy too
        out[str(workers)] = _corun_in(config, model, round(sessions * scale), session_rate * scale)
    return {"by_workers": out}


def _corun_in(config: str, model: StepTimeModel, sessions: int, session_rate: float) -> dict[str, Any]:
    from bench.replay import ReplayConfig, replay
    from bench.sim.steps import corun_by_tokens, load_steps
    from disagg.workload import agent
    from disagg.workload.record import TraceScale

    spans = tempfile.mkdtemp(prefix="machine-spans-")
    try:
        with _service(config, tracing=spans) as service:
            tiny_requests(service.url, 5)  # warm-up
            trace = agent.generate(agent.parse_mix("coding_agent"), sessions, session_rate, seed=1)
            cfg = ReplayConfig(
                url=service.url,
                scale=TraceScale(block_tokens=EngineConfig.block_size, max_input_tokens=1791, max_output_tokens=256),
                progress=False,
            )
            asyncio.run(replay(trace, cfg))
        return corun_by_tokens(load_steps(spans), model)
    finally:
        shutil.rmtree(spans, ignore_errors=True)


def _engine_ttfts(lengths: list[int], n: int, out: Any) -> None:
    """The engine alone (1 thread, no Ray, no HTTP): seconds from add() to a 1-token request's end, n distinct
    prompts per length (as tiny_requests sends them)."""
    from disagg.protocol import Request, SamplingParams

    engine = _local_engine(threads=1)
    result: dict[int, list[float]] = {}
    for length in lengths:
        times = []
        for i in range(n + 3):  # the first 3 warm up
            prompt = [5000 + 100 * length + i, *(200 + 37 * j for j in range(1, length))]
            engine.add(Request(f"t{length}-{i}", prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
            t0 = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            times.append(time.perf_counter() - t0)
        result[length] = times[3:]
    out.put(result)


def engine_ttfts(lengths: list[int], n: int) -> dict[int, float]:
    """Median of _engine_ttfts per length, in a fresh process (the measuring process stays free of torch)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_engine_ttfts, args=(lengths, n, out))
    proc.start()
    got = out.get(timeout=600)
    proc.join(timeout=60)
    return {length: statistics.median(times) for length, times in got.items()}


# ---------------------------------------------------------------------- 2 and 3: on a real 2-worker cluster
def _group(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if proc.pid == os.getpid():
        return "client"
    if "Worker" in cmd and "ray::" in cmd and "Router" not in cmd:
        return "engines"
    if "RouterActor" in cmd:
        return "router"
    if "ray" in cmd:
        return "ray"
    return "other"


def cpu_by_group() -> dict[int, tuple[str, float]]:
    snap: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter():
        try:
            t = proc.cpu_times()
            snap[proc.pid] = (_group(proc), t.user + t.system + t.children_user + t.children_system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return snap


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    groups: dict[str, float] = {}
    for pid, (group, t) in after.items():
        groups[group] = groups.get(group, 0.0) + t - before.get(pid, (group, 0.0))[1]
    return groups


def cpu_during(fn: Callable[[], Any]) -> tuple[Any, dict[str, float], float]:
    """fn()'s result, the CPU seconds every process group spent while it ran, and the wall seconds it took."""
    before, t0 = cpu_by_group(), time.perf_counter()
    result = fn()
    return result, cpu_delta(before, cpu_by_group()), time.perf_counter() - t0


def tiny_requests(url: str, n: int, prompt_tokens: int = 8, first_id: int = 100) -> list[float]:
    """TTFT of n sequential 1-token requests with distinct prompt_tokens-long prompts (no prefix is shared: the
    first token differs)."""
    import httpx

    ttfts = []
    with httpx.Client(base_url=url, timeout=60) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for i in range(n):
            prompt = [first_id + i, *(200 + 37 * j for j in range(1, prompt_tokens))]
            body = {"model": model, "prompt": prompt, "max_tokens": 1, "stream": True, "ignore_eos": True}
            t0 = time.perf_counter()
            first = None
            with client.stream("POST", "/v1/completions", json=body) as resp:
                for line in resp.iter_lines():  # read to the end: the request is over only then
                    if first is None and line.startswith("data: ") and line != "data: [DONE]":
                        first = time.perf_counter() - t0
            if first is None:
                raise RuntimeError(f"no token in the answer to tiny request {i}")
            ttfts.append(first)
    return ttfts


@contextlib.contextmanager
def _service(config_spec: str, tracing: str | None = None) -> Iterator[Any]:
    """A real cluster serving HTTP for one `bench compare` config spec (as bench.sim.validate runs it through
    bench/compare.py run_one: the same engine settings and a fresh disk-tier directory), shut down after."""
    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.model_store import default_model_dir
    from disagg.sim.spec import parse_configs
    from disagg.tracing import TracingConfig

    spec = parse_configs(config_spec)[0]
    engine = EngineConfig(
        model=str(default_model_dir()), kv_cache_memory_mb=KV_CACHE_MB, max_model_len=MAX_MODEL_LEN, num_threads=1
    )
    disk_root = tempfile.mkdtemp(prefix="machine-kv-")
    cluster = ClusterConfig(
        num_prefill=spec.num_prefill,
        num_decode=spec.num_decode,
        engine=engine,
        tiers=spec.tiers(disk_root),
        tracing=TracingConfig(file_dir=tracing) if tracing else None,
    )
    service = Service(cluster, RouterConfig(policy=spec.policy_config()))
    try:
        yield service
    finally:
        service.shutdown()
        shutil.rmtree(disk_root, ignore_errors=True)


def cluster_costs(
    model: StepTimeModel, requests: int, sessions: int, session_rate: float, idle_s: float = 5.0
) -> dict[str, Any]:
    from bench.replay import ReplayConfig, replay
    from disagg.workload import agent
    from disagg.workload.record import TraceScale

    with _service("agg-kv=0x2:kv") as service:
        tiny_requests(service.url, 5)  # warm-up
        _, idle_cpu, idle_wall = cpu_during(lambda: time.sleep(idle_s))  # what Ray and the router burn at rest
        ttfts, tiny_cpu, tiny_wall = cpu_during(lambda: tiny_requests(service.url, requests))
        step = _prefill_step(model, 8)  # the 8-token prompt's one prefill step
        trace = agent.generate(agent.parse_mix("coding_agent"), sessions, session_rate, seed=0)
        cfg = ReplayConfig(
            url=service.url,
            scale=TraceScale(block_tokens=EngineConfig.block_size, max_input_tokens=1791, max_output_tokens=256),
            progress=False,
        )
        result, cpu, wall = cpu_during(lambda: asyncio.run(replay(trace, cfg)))
    done = [r for r in result.records if r.ok]
    tokens = sum(r.output_tokens for r in done)
    idle = _serving(idle_cpu) / idle_wall  # cores, always
    serving = _serving(cpu) - idle * wall
    # a request's fixed serving CPU from the tiny requests (one token each); the run's remainder is per token
    per_request = max(0.0, _serving(tiny_cpu) - idle * tiny_wall) / max(1, requests)
    per_token = max(0.0, serving - per_request * len(done)) / max(1, tokens)
    return {
        "tiny_ttft_ms": {"p50": statistics.median(ttfts) * 1000, "mean": statistics.mean(ttfts) * 1000},
        "predicted_step_ms": step * 1000,
        "request_overhead_ms": (statistics.median(ttfts) - step) * 1000,
        "idle_cpu_s": idle_cpu,
        "idle_wall_s": idle_wall,
        "idle_serving_cores": idle,
        "tiny_cpu_s": tiny_cpu,
        "run": {"wall_s": wall, "requests": len(done), "output_tokens": tokens, "cpu_s": cpu},
        "serving_cpu_s_per_request": per_request,
        "serving_cpu_s_per_token": per_token,
        "serving_cores_mean": serving / wall + idle,
    }


def handoff_costs(model: StepTimeModel, requests: int, prompt_tokens: int = 128, idle_s: float = 5.0) -> dict[str, Any]:
    """What the disaggregated path adds to a request, on a real 1 prefill + 1 decode cluster at idle.

    8-token prompts stay on the decode worker (below the policy's min_remote_prefill_tokens); prompt_tokens-long
    ones are prefilled remotely, then the decode worker reads their KV over NIXL.  The remote TTFT minus the local
    one, minus the difference of the engine's own times for the two (measured alone, before the cluster starts)
    and the predicted transfer, is the hand-off's fixed cost: the prefill call returning to the router, the decode
    call, the NIXL read's set-up and its notification.  Every remote request is checked to have taken the
    disaggregated path (the router's own counter)."""
    alone = engine_ttfts([8, prompt_tokens], requests)
    with _service("disagg-kv=1x1:kv") as service:
        tiny_requests(service.url, 5, prompt_tokens, first_id=3000)  # warm-up of both paths
        tiny_requests(service.url, 5, 8, first_id=4000)
        _, idle_cpu, idle_wall = cpu_during(lambda: time.sleep(idle_s))
        local, local_cpu, local_wall = cpu_during(lambda: tiny_requests(service.url, requests, 8, first_id=100))
        before = _paths(service.url)
        remote, remote_cpu, remote_wall = cpu_during(
            lambda: tiny_requests(service.url, requests, prompt_tokens, first_id=1000)
        )
        after = _paths(service.url)
    went_remote = after.get("disaggregated", 0) - before.get("disaggregated", 0)
    if went_remote != requests:
        raise RuntimeError(f"{went_remote} of {requests} {prompt_tokens}-token requests were prefilled remotely")
    step_local, step_remote = alone[8], alone[prompt_tokens]
    blocks = cdiv(prompt_tokens, EngineConfig.block_size)
    transfer = model.transfer_time(blocks)
    idle = _serving(idle_cpu) / idle_wall
    cpu_local = max(0.0, _serving(local_cpu) - idle * local_wall) / requests
    cpu_remote = max(0.0, _serving(remote_cpu) - idle * remote_wall) / requests
    gap = statistics.median(remote) - statistics.median(local)
    return {
        "prompt_tokens": prompt_tokens,
        "requests": requests,
        "local_ttft_ms": {"p50": statistics.median(local) * 1000, "mean": statistics.mean(local) * 1000},
        "remote_ttft_ms": {"p50": statistics.median(remote) * 1000, "mean": statistics.mean(remote) * 1000},
        "engine_alone_ms": {"local": step_local * 1000, "remote": step_remote * 1000},
        "predicted_step_ms": {
            "local": _prefill_step(model, 8) * 1000,
            "remote": _prefill_step(model, prompt_tokens) * 1000,
        },
        "local_overhead_ms": (statistics.median(local) - step_local) * 1000,
        "predicted_transfer_ms": transfer * 1000,
        "handoff_overhead_ms": (gap - (step_remote - step_local) - transfer) * 1000,
        "serving_cpu_s_per_request": {"local": cpu_local, "remote": cpu_remote},
        "serving_cpu_s_per_handoff": max(0.0, cpu_remote - cpu_local),
    }


def _paths(url: str) -> dict[str, float]:
    """The router's requests_by_path counter, by path."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name == "disagg:requests_by_path":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["path"]] = sample.value
    return out


def _serving(cpu: dict[str, float]) -> float:
    return sum(v for k, v in cpu.items() if k not in ("engines", "gone"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.sim.machine", description=__doc__.splitlines()[0])
    add_options(p, MachineOptions)
    args = from_options(MachineOptions, p.parse_args(argv))
    model = StepTimeModel.load(args.time_model)
    parts = args.parts.split(",")
    out: dict[str, Any] = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    out["cores"] = len(os.sched_getaffinity(0))
    out["cpu"] = cpu_model()  # every figure names the CPU it was measured on
    if "corun" in parts:
        out["corun"] = corun(model, args.sessions, args.session_rate)
        print(json.dumps(out["corun"]), flush=True)
    if "cluster" in parts:
        out["cluster"] = cluster_costs(model, args.requests, args.sessions, args.session_rate)
        print(json.dumps(out["cluster"], indent=2), flush=True)
    if "handoff" in parts:
        out["handoff"] = handoff_costs(model, args.requests)
        print(json.dumps(out["handoff"], indent=2), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
