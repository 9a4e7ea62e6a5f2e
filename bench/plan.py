"""`disagg plan`: pick the prefill:decode split for a workload, a worker count and TTFT/TPOT SLOs.

Every configuration worth trying runs through the calibrated simulator (bench/sim/): aggregated KV routing
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
from pathlib import Path
from typing import Any

from bench.compare import ClusterSpec
from bench.report import SLO, RequestRecord, parse_slos
from bench.sim.run import add_sim_args, sim_config, simulate
from bench.sim.timemodel import StepTimeModel
from bench.traces.record import TraceScale
from bench.workload import add_workload_args, load_workload


def split_grid(workers: int, points: int = 6) -> list[int]:
    """Prefill worker counts to try first: an even grid over 1..workers-1."""
    if workers < 2:
        return []
    step = max(1, (workers - 1) // points)
    return sorted({*range(1, workers, step), workers - 1})


def miss_shares(records: list[RequestRecord], slo: SLO) -> tuple[float, float]:
    """Share of requests (refused or failed ones count as missing both) missing the TTFT SLO, and the TPOT SLO."""
    if not records:
        return 0.0, 0.0
    ttft = sum(not r.ok or r.ttft_s is None or r.ttft_s * 1000 > slo.ttft_ms for r in records)
    tpot = sum(not r.ok or (r.tpot_s is not None and r.tpot_s * 1000 > slo.tpot_ms) for r in records)
    return ttft / len(records), tpot / len(records)


class Search:
    def __init__(self, args: argparse.Namespace, trace: list, scale: TraceScale, model: StepTimeModel, slo: SLO):
        self.args, self.trace, self.scale, self.model, self.slo = args, trace, scale, model, slo
        self.results: dict[str, dict[str, Any]] = {}
        self.budget_bound = False  # whether the last split search stopped at its budget

    def run(self, spec: ClusterSpec) -> dict[str, Any]:
        if spec.name in self.results:
            return self.results[spec.name]
        result = simulate(self.trace, self.scale, sim_config(spec, self.args, self.model, self.slo), self.model)
        m = result.metrics(self.slo, parse_slos(self.args.extra_slos))
        ttft_miss, tpot_miss = miss_shares(result.records, self.slo)
        row = {"config": spec.name, "prefill": spec.num_prefill, "decode": spec.num_decode,
               "dynamic": spec.planner, "goodput": m["request_goodput"], "slo_met": m["goodput_fraction"],
               "ttft_p50_ms": m["median_ttft_ms"], "ttft_p90_ms": m["p90_ttft_ms"],
               "tpot_p50_ms": m["median_tpot_ms"], "tpot_p90_ms": m["p90_tpot_ms"],
               "cached": m.get("usage_cached_ratio"), "ttft_miss": ttft_miss, "tpot_miss": tpot_miss,
               "role_changes": len(m["sim"].get("role_changes", [])), "final_split": m["sim"].get("final_split")}
        self.results[spec.name] = row
        print(f"  {spec.name:>16}: goodput {row['goodput']:.3f} req/s, SLO met {row['slo_met']:.0%}, TTFT p90 "
              f"{row['ttft_p90_ms']:,.0f} ms, TPOT p90 {row['tpot_p90_ms']:,.1f} ms", flush=True)
        return row

    def splits(self, workers: int, budget: int = 0, exhaustive: bool = False) -> dict[int, dict[str, Any]]:
        """Every split (`exhaustive`), or a coarse grid over P, then halving the step around the best, then
        climbing at +-1 until both neighbours of the best split are measured: the best is then a local optimum
        at one-worker resolution.  `budget` > 0 caps the splits simulated (the result says if it bound)."""
        def spec(p: int) -> ClusterSpec:
            return ClusterSpec(f"disagg {p}x{workers - p}", p, workers - p, "kv")

        def room() -> bool:
            return budget <= 0 or len(rows) < budget

        grid = list(range(1, workers)) if exhaustive else split_grid(workers)
        rows: dict[int, dict[str, Any]] = {}
        for p in grid:
            if room():
                rows[p] = self.run(spec(p))
        step = grid[1] - grid[0] if len(grid) > 1 else 1
        while rows and room():
            best = max(rows, key=lambda p: (rows[p]["goodput"], -rows[p]["ttft_p90_ms"]))
            step = max(1, step // 2)
            todo = [p for p in (best - step, best + step) if 1 <= p < workers and p not in rows]
            if step == 1 and not todo:
                break  # the best split's neighbours are both measured
            for p in todo:
                if room():
                    rows[p] = self.run(spec(p))
        self.budget_bound = not room()
        return rows


def ranking(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-r["goodput"], r["ttft_p90_ms"]))


def reason(ranked: list[dict[str, Any]]) -> str:
    best = ranked[0]
    if len(ranked) == 1:
        return f"{best['config']} is the only configuration"
    second = ranked[1]
    gain = best["goodput"] / second["goodput"] - 1 if second["goodput"] else float("inf")
    if gain < 0.01:
        close = [r["config"] for r in ranked if r["goodput"] >= best["goodput"] * 0.99]
        return (f"{len(close)} configurations are within 1% of the best goodput ({best['goodput']:.3f} req/s): "
                f"{', '.join(close)}; the load does not separate them (every one serves it within the SLO or "
                f"misses it alike); {best['config']} is listed first")
    what = "TTFT" if second["ttft_miss"] - best["ttft_miss"] >= second["tpot_miss"] - best["tpot_miss"] else "TPOT"
    return (f"{best['config']} wins: goodput {best['goodput']:.3f} req/s vs {second['config']} "
            f"{second['goodput']:.3f} ({gain:+.0%}); the runner-up misses {what} more often (TTFT on "
            f"{second['ttft_miss']:.0%} / TPOT on {second['tpot_miss']:.0%} of requests, against "
            f"{best['ttft_miss']:.0%} / {best['tpot_miss']:.0%})")


def markdown(ranked: list[dict[str, Any]]) -> str:
    head = ("| rank | config | goodput req/s | SLO met | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 | cached | "
            "misses TTFT / TPOT | role changes |")
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(ranked, 1):
        cached = "-" if r["cached"] is None else f"{r['cached']:.0%}"
        lines.append(f"| {i} | {r['config']} | {r['goodput']:.3f} | {r['slo_met']:.0%} | {r['ttft_p50_ms']:,.0f} | "
                     f"{r['ttft_p90_ms']:,.0f} | {r['tpot_p50_ms']:,.1f} | {r['tpot_p90_ms']:,.1f} | {cached} | "
                     f"{r['ttft_miss']:.0%} / {r['tpot_miss']:.0%} | {r['role_changes']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disagg plan", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, required=True, help="workers to split between prefill and decode")
    p.add_argument("--rate", type=float, default=1.0, help="load: multiplier on the workload's pace")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--extra-slos", default="", help="more TTFT_MS/TPOT_MS pairs to report goodput at")
    p.add_argument("--budget", type=int, default=0,
                   help="disaggregated splits to simulate at most (0: as many as the search needs)")
    p.add_argument("--exhaustive", action="store_true", help="simulate every split 1..workers-1")
    p.add_argument("--dynamic", action="store_true", help="also rank the planner, starting from the best split")
    p.add_argument("--dynamic-from", default="", help="PxD the planner starts from (default: the best static split)")
    p.add_argument("--out", default="bench/results/plan")
    add_sim_args(p)
    add_workload_args(p)
    args = p.parse_args(argv)
    trace, scale, workload = load_workload(args)
    scale = TraceScale(**{**scale.__dict__, "time_scale": scale.time_scale * args.rate})
    model = StepTimeModel.load(args.time_model) if args.time_model else StepTimeModel()
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    search = Search(args, trace, scale, model, slo)
    print(f"planning {args.workers} workers for {workload['name']} at {args.rate:g}x "
          f"(SLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms; time model: {model.source})", flush=True)
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
    (out / "plan.json").write_text(json.dumps({"workload": workload, "scale": scale.describe(), "rate": args.rate,
                                               "workers": args.workers, "slo": slo.__dict__, "reason": why,
                                               "time_model": model.__dict__, "ranking": ranked}, indent=2))
    (out / "plan.md").write_text(text + "\n\n" + why + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
