"""The search behind `disagg plan` (disagg/planning/cli.py): simulates cluster specs on one workload in the calibrated
simulator (disagg/sim/), searches prefill:decode splits coarse to fine, ranks the results by goodput and says what
separates the best from the runner-up."""

from __future__ import annotations

import argparse
from typing import Any

from disagg.sim.run import sim_config, simulate
from disagg.sim.spec import ClusterSpec
from disagg.sim.timemodel import StepTimeModel
from disagg.workload.metrics import SLO, RequestRecord, parse_slos
from disagg.workload.record import TraceScale


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
        row = {
            "config": spec.name,
            "prefill": spec.num_prefill,
            "decode": spec.num_decode,
            "dynamic": spec.planner,
            "goodput": m["request_goodput"],
            "slo_met": m["goodput_fraction"],
            "ttft_p50_ms": m["median_ttft_ms"],
            "ttft_p90_ms": m["p90_ttft_ms"],
            "tpot_p50_ms": m["median_tpot_ms"],
            "tpot_p90_ms": m["p90_tpot_ms"],
            "cached": m.get("usage_cached_ratio"),
            "ttft_miss": ttft_miss,
            "tpot_miss": tpot_miss,
            "role_changes": len(m["sim"].get("role_changes", [])),
            "final_split": m["sim"].get("final_split"),
        }
        self.results[spec.name] = row
        print(
            f"  {spec.name:>16}: goodput {row['goodput']:.3f} req/s, SLO met {row['slo_met']:.0%}, TTFT p90 "
            f"{row['ttft_p90_ms']:,.0f} ms, TPOT p90 {row['tpot_p90_ms']:,.1f} ms",
            flush=True,
        )
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
        return (
            f"{len(close)} configurations are within 1% of the best goodput ({best['goodput']:.3f} req/s): "
            f"{', '.join(close)}; the load does not separate them (every one serves it within the SLO or "
            f"misses it alike); {best['config']} is listed first"
        )
    what = "TTFT" if second["ttft_miss"] - best["ttft_miss"] >= second["tpot_miss"] - best["tpot_miss"] else "TPOT"
    return (
        f"{best['config']} wins: goodput {best['goodput']:.3f} req/s vs {second['config']} "
        f"{second['goodput']:.3f} ({gain:+.0%}); the runner-up misses {what} more often (TTFT on "
        f"{second['ttft_miss']:.0%} / TPOT on {second['tpot_miss']:.0%} of requests, against "
        f"{best['ttft_miss']:.0%} / {best['tpot_miss']:.0%})"
    )


def markdown(ranked: list[dict[str, Any]]) -> str:
    head = (
        "| rank | config | goodput req/s | SLO met | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 | cached | "
        "misses TTFT / TPOT | role changes |"
    )
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(ranked, 1):
        cached = "-" if r["cached"] is None else f"{r['cached']:.0%}"
        lines.append(
            f"| {i} | {r['config']} | {r['goodput']:.3f} | {r['slo_met']:.0%} | {r['ttft_p50_ms']:,.0f} | "
            f"{r['ttft_p90_ms']:,.0f} | {r['tpot_p50_ms']:,.1f} | {r['tpot_p90_ms']:,.1f} | {cached} | "
            f"{r['ttft_miss']:.0%} / {r['tpot_miss']:.0%} | {r['role_changes']} |"
        )
    return "\n".join(lines)
