"""Role shift: the role planner on a real cluster against every static split of the same workers (issue: disaggregation
that pays, part 3), over HTTP with mock workers (cluster/mocker.py: each step sleeps the step-time model's time x
--mock-time-scale, so the workers' capacity is theirs, not the 2 cores').

One model on --workers workers.  Workload: the Mooncake conversation trace's prompts, each on hash ids of its own
(no prefix is shared), as two Poisson phases of --phase-s seconds: first decode-heavy (prompts cut to
--short-blocks blocks, --long-output tokens out) at --decode-rate requests/s, then prefill-heavy (prompts of
--long-blocks blocks, --short-output tokens out) at --prefill-rate.  Every arm gets the same requests at the same
times.

  static P+D   P prefill and D decode workers, fixed (P = 0: aggregated), threshold placement
  planner      starts from --planner-start (the split that suits the first phase); the planner moves workers
               between prefill and decode from the SLOs and the queues (planner/policy.py)
Goodput: requests meeting both SLOs.  Arms interleaved, --repeats times; each repeat's ratio is the planner over the
best static split of that repeat; medians with their range.  The planner's moves are listed with their times from
the phase flip.

    .venv/bin/python -m bench.role_shift --repeats 3 --out bench/results/role_shift.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
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
from disagg.options import add_options, from_options
from disagg.planner.policy import PlannerConfig
from disagg.router.admission import CapacityConfig
from disagg.workload import loaders
from disagg.workload.metrics import SLO
from disagg.workload.record import TraceRequest, TraceScale

TRACE = "mooncake_conversation_trace.jsonl"
HASH_SPACE = 1 << 20  # each request's hash ids are moved by its index times this: no prefix is shared
NATIVE_BLOCK = 512  # the trace's tokens per hash id


@dataclass
class RoleShiftOptions:
    workers: int = field(default=4, metadata={"help": "mock workers in every arm"})
    planner_start: str = field(default="1+3", metadata={"help": "the planner arm's first split, P+D"})
    phase_s: float = field(default=60.0, metadata={"help": "seconds of each phase"})
    decode_rate: float = field(default=7.0, metadata={"help": "requests/s in the decode-heavy phase"})
    prefill_rate: float = field(default=3.5, metadata={"help": "requests/s in the prefill-heavy phase"})
    short_blocks: int = field(default=2, metadata={"help": "decode-heavy prompts: blocks of 16 tokens"})
    long_output: int = field(default=192, metadata={"help": "decode-heavy output tokens"})
    long_blocks: int = field(default=48, metadata={"help": "prefill-heavy prompts: blocks of 16 tokens (at most)"})
    short_output: int = field(default=64, metadata={"help": "prefill-heavy output tokens"})
    max_running: int = field(default=8, metadata={"help": "admission: requests per worker"})
    mock_time_scale: float = field(default=0.25, metadata={"help": "mock steps sleep the modelled time x this"})
    slo_ttft_ms: float = field(default=2000.0, metadata={"help": "SLO: time to first token"})
    slo_tpot_ms: float = field(default=25.0, metadata={"help": "SLO: time per output token (mock time)"})
    repeats: int = field(default=3, metadata={"help": "runs per arm (interleaved)"})
    arms: str = field(default="", metadata={"help": "comma-separated arms to run (e.g. planner,2+2); empty: all"})
    out: str = field(default="", metadata={"help": "write the result JSON here"})


def _split(text: str) -> tuple[int, int]:
    p, d = (int(x) for x in text.split("+"))
    return p, d


def _service(split: tuple[int, int], opts: RoleShiftOptions, planned: bool) -> Service:
    engine = EngineConfig(num_threads=1, max_model_len=4096)
    cluster = ClusterConfig(
        num_prefill=split[0], num_decode=split[1], engine=engine, tiers=None,
        mock=MockConfig(time_scale=opts.mock_time_scale),
    )  # fmt: skip
    planner = PlannerConfig(enabled=planned, ttft_slo_s=opts.slo_ttft_ms / 1000, tpot_slo_s=opts.slo_tpot_ms / 1000)
    return Service(cluster, RouterConfig(capacity=CapacityConfig(max_running=opts.max_running), planner=planner))


def workload(pool: list[TraceRequest], opts: RoleShiftOptions, rng: random.Random) -> list[TraceRequest]:
    """The two phases' Poisson arrivals; the requests are the trace's in order, reshaped to each phase."""
    out, t, i = [], 0.0, 0
    long_pool = [r for r in pool if len(r.hash_ids) >= opts.long_blocks // 2]
    for phase, rate in enumerate((opts.decode_rate, opts.prefill_rate)):
        end = (phase + 1) * opts.phase_s
        while (t := t + rng.expovariate(rate)) < end:
            source = (pool if phase == 0 else long_pool)[i % len(pool if phase == 0 else long_pool)]
            blocks = opts.short_blocks if phase == 0 else min(opts.long_blocks, len(source.hash_ids))
            hashes = [h + (i + 1) * HASH_SPACE for h in source.hash_ids[:blocks]]
            output = opts.long_output if phase == 0 else opts.short_output
            out.append(
                dataclasses.replace(
                    source, timestamp_ms=t * 1000, hash_ids=hashes, input_length=blocks * NATIVE_BLOCK,
                    output_length=output, session_id=None, turn=None,
                )
            )  # fmt: skip
            i += 1
        t = end  # memoryless: the next phase's first arrival is drawn from its own start
    return out


def _figures(result: ReplayResult, slo: SLO, phase_s: float) -> dict[str, Any]:
    m = result.metrics(slo)
    keep = ("goodput_fraction", "completed", "failed", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms")
    good = [r for r in result.records if r.ok and slo.met(r)]
    first = sum(1 for r in good if r.start_s < phase_s)
    return {**{k: m.get(k) for k in keep}, "good": len(good), "good_per_phase": [first, len(good) - first]}


def one_repeat(trace: list[TraceRequest], opts: RoleShiftOptions, order: list[str]) -> dict[str, Any]:
    scale = TraceScale(block_tokens=16, native_block=NATIVE_BLOCK, output_scale=1.0)
    slo = SLO(ttft_ms=opts.slo_ttft_ms, tpot_ms=opts.slo_tpot_ms)
    arms: dict[str, Any] = {}
    for arm in order:
        planned = arm == "planner"
        service = _service(_split(opts.planner_start if planned else arm), opts, planned)
        try:
            result = asyncio.run(replay(trace, ReplayConfig(url=service.url, scale=scale, progress=False)))
            roles = httpx.get(f"{service.url}/admin/roles", timeout=30).json()
        finally:
            service.shutdown()
        arms[arm] = _figures(result, slo, opts.phase_s)
        if planned:  # each move's start from the phase flip, and how long its drain took
            flip = result.started_at + opts.phase_s
            moves = [
                {"from": c["from"], "to": c["to"], "reason": c["reason"], "at_s": round(c["at"] - flip, 1),
                 "took_s": round(c["seconds"], 2), "state": c["state"]}
                for c in roles["changes"]
            ]  # fmt: skip
            arms[arm].update(moves=moves, final_roles=roles["roles"])
        print(arm, {k: arms[arm][k] for k in ("good", "good_per_phase", "completed", "failed")}, flush=True)
    return planner_verdict(arms)  # a partial run (--arms): no ratio


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.role_shift", description=__doc__.splitlines()[0])
    add_options(p, RoleShiftOptions)
    opts = from_options(RoleShiftOptions, p.parse_args(argv))
    trace = workload(loaders.load(TRACE), opts, random.Random(0))
    arms = [f"{k}+{opts.workers - k}" for k in range(opts.workers)] + ["planner"]
    arms = [a for a in arms if not opts.arms or a in opts.arms.split(",")]
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    runs: list[dict] = []
    try:
        for i in range(opts.repeats):
            order = arms[i % len(arms) :] + arms[: i % len(arms)]  # interleaved: each repeat starts elsewhere
            runs.append(one_repeat(trace, opts, order))
            print({"ratio": runs[-1]["ratio"], "best_static": runs[-1]["best_static"]}, flush=True)
    finally:
        ray.shutdown()
    ratios = [r["ratio"] for r in runs if r["ratio"] is not None] or [0.0]
    rows = [
        {"goal": "role planner / best static split, requests meeting both SLOs", "median (range)": median_range(ratios)}
    ]
    print_table(rows, f"role shift: {opts.workers} mock workers, decode-heavy then prefill-heavy")
    emit(
        {"options": dataclasses.asdict(opts), "cpu": cpu_model(), "requests": len(trace), "runs": runs},
        opts.out or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
