"""`disagg plan`: pick the prefill:decode split for a workload, a worker count and TTFT/TPOT SLOs.

Every configuration worth trying runs through the calibrated simulator (disagg/sim/): aggregated KV routing
(0xN), disaggregated splits PxD searched coarse to fine (a grid over P, halving the step around the best, then
+-1 until the best split's neighbours are both measured; --exhaustive: every split), and, with --dynamic, the
planner starting from the best static split.
The ranking is by goodput (requests per second meeting both SLOs), ties broken by TTFT p90; the reason line says
what separates the best from the runner-up (which SLO the runner-up misses, and how often).

    disagg plan --agent coding_agent:2,short_chat:1 --sessions 200 --session-rate 4 --workers 64 \\
        --slo-ttft-ms 2000 --slo-tpot-ms 200 --time-model bench/results/time_model.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from disagg.options import add_options, from_options
from disagg.planning.search import Search, markdown, ranking, reason
from disagg.sim.options import add_sim_args
from disagg.sim.spec import ClusterSpec
from disagg.sim.timemodel import StepTimeModel
from disagg.workload.metrics import SLO
from disagg.workload.options import add_workload_args, load_workload
from disagg.workload.record import TraceScale


@dataclass
class PlanOptions:
    """`disagg plan`'s own options (the simulator's and the workload's are shared with `bench simulate`)."""

    workers: int = field(metadata={"help": "workers to split between prefill and decode"})
    rate: float = field(default=1.0, metadata={"help": "load: multiplier on the workload's pace"})
    extra_slos: str = field(default="", metadata={"help": "more TTFT_MS/TPOT_MS pairs to report goodput at"})
    budget: int = field(
        default=0, metadata={"help": "disaggregated splits to simulate at most (0: as many as the search needs)"}
    )
    exhaustive: bool = field(default=False, metadata={"help": "simulate every split 1..workers-1"})
    dynamic: bool = field(default=False, metadata={"help": "also rank the planner, starting from the best split"})
    dynamic_from: str = field(
        default="", metadata={"help": "PxD the planner starts from (default: the best static split)"}
    )
    out: str = field(default="bench/results/plan", metadata={"help": "directory for plan.json and plan.md"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disagg plan", description=__doc__.splitlines()[0])
    add_options(p, PlanOptions, only=("workers", "rate"))
    add_options(p, SLO, prefix="slo-")
    add_options(p, PlanOptions, skip=("workers", "rate"))
    add_sim_args(p)
    add_workload_args(p)
    args = p.parse_args(argv)
    trace, scale, workload = load_workload(args)
    scale = TraceScale(**{**scale.__dict__, "time_scale": scale.time_scale * args.rate})
    model = StepTimeModel.load(args.time_model) if args.time_model else StepTimeModel()
    slo = from_options(SLO, args, prefix="slo-")
    search = Search(args, trace, scale, model, slo)
    print(
        f"planning {args.workers} workers for {workload['name']} at {args.rate:g}x "
        f"(SLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms; time model: {model.source})",
        flush=True,
    )
    search.run(ClusterSpec(f"agg-kv 0x{args.workers}", 0, args.workers, "kv"))
    search.splits(args.workers, args.budget, exhaustive=args.exhaustive)
    if args.dynamic or args.dynamic_from:
        if args.dynamic_from:
            start_p, start_d = (int(x) for x in args.dynamic_from.lower().split("x"))
        else:
            best = ranking(list(search.results.values()))[0]
            start_p, start_d = best["prefill"], best["decode"]
        search.run(ClusterSpec(f"dynamic from {start_p}x{start_d}", start_p, start_d, "kv", planner=True))
    ranked = ranking(list(search.results.values()))
    text = markdown(ranked)
    why = reason(ranked)
    print(text + "\n\n" + why)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(
        json.dumps(
            {
                "workload": workload,
                "scale": scale.describe(),
                "rate": args.rate,
                "workers": args.workers,
                "slo": slo.__dict__,
                "reason": why,
                "time_model": model.__dict__,
                "ranking": ranked,
            },
            indent=2,
        )
    )
    (out / "plan.md").write_text(text + "\n\n" + why + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
