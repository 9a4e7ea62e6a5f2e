"""Does disaggregation pay?  The adaptive runtime (cost-priced placement for the TTFT SLO, prompt chunks sized to
the TPOT SLO: a spec's `:adaptive=1`) against aggregated serving and every static split, on one workload at
several loads.

Real clusters (`disagg bench compare`, a fresh cluster per run) repeated `--repeats` times, each repeat running
every configuration at every load in turn (interleaved), or the simulator (`--simulate`: the same router, policy
and engine code in virtual time; deterministic, so one pass).  The summary gives each arm's median goodput with
its range, and each adaptive arm against the best aggregated arm (P=0) and the best static split (no adaptive
setting) at the same load: "met" only when the ranges do not overlap.

    python -m bench.adaptive --trace mooncake_conversation_trace.jsonl --limit 60 --time-scale 0.1 --rates 1,2,4 \\
        --repeats 3 --out bench/results/adaptive_real
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disagg.options import add_options, from_options
from disagg.sim.spec import parse_configs

CONFIGS = (
    "agg-kv=0x2:kv,agg-adaptive=0x2:kv:adaptive=1,disagg-kv=1x1:kv,adaptive=1x1:kv:adaptive=1"  # 2 workers, 2 cores
)


@dataclass
class AdaptiveOptions:
    configs: str = field(default=CONFIGS, metadata={"help": "name=PxD:policy[:adaptive=1],... (bench compare's)"})
    rates: str = field(default="1,2,4", metadata={"help": "load levels: multipliers on the trace's pace"})
    repeats: int = field(default=3, metadata={"help": "interleaved passes over every config and load (real runs)"})
    simulate: bool = field(default=False, metadata={"help": "the simulator instead of real clusters (one pass)"})
    out: str = field(default="bench/results/adaptive", metadata={"help": "output directory"})


def summarize(passes: list[list[dict[str, Any]]], configs: str) -> dict[str, Any]:
    """Per (config, rate): goodput median and range over the passes; per adaptive arm and rate: its ratio to the
    best aggregated and the best static arm (by median), and whether the ranges are apart."""
    specs = {s.name: s for s in parse_configs(configs)}
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for runs in passes:
        for run in runs:
            cells.setdefault((run["config"], run["rate"]), []).append(run["metrics"])
    table = []
    for (name, rate), metrics in cells.items():
        goodput = [m["request_goodput"] for m in metrics]
        table.append(
            {
                "config": name,
                "rate": rate,
                "goodput": statistics.median(goodput),
                "goodput_min": min(goodput),
                "goodput_max": max(goodput),
                "ttft_p50_ms": statistics.median(m["median_ttft_ms"] for m in metrics),
                "tpot_mean_ms": statistics.median(m["mean_tpot_ms"] for m in metrics),
                "slo_met": statistics.median(m["goodput_fraction"] for m in metrics),
                "passes": len(metrics),
            }
        )
    verdicts = []
    for row in table:
        if not specs[row["config"]].adaptive:
            continue
        peers = [r for r in table if r["rate"] == row["rate"] and r["config"] != row["config"]]
        static = [r for r in peers if not specs[r["config"]].planner]  # a planner's arm is no fixed configuration
        fixed = [r for r in static if not specs[r["config"]].adaptive]
        for kind, pool in (  # aggregated: no split, chunks sized or not; static: a fixed split, threshold placement
            ("aggregated", [r for r in static if specs[r["config"]].num_prefill == 0]),
            ("static split", [r for r in fixed if specs[r["config"]].num_prefill > 0]),
        ):
            if not pool:
                continue
            best = max(pool, key=lambda r: r["goodput"])
            verdicts.append(
                {
                    "adaptive": row["config"],
                    "rate": row["rate"],
                    "against": f"best {kind} ({best['config']})",
                    "ratio": row["goodput"] / best["goodput"] if best["goodput"] else float("inf"),
                    # ranges say something from 3 passes on (None: fewer)
                    "apart": (row["goodput_min"] > best["goodput_max"] or row["goodput_max"] < best["goodput_min"])
                    if row["passes"] >= 3 and best["passes"] >= 3
                    else None,
                }
            )
    return {"table": table, "verdicts": verdicts}


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| config | load | goodput req/s median (range) | SLO met | TTFT p50 ms | TPOT mean ms | passes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(summary["table"], key=lambda r: (r["rate"], r["config"])):
        lines.append(
            f"| {r['config']} | {r['rate']:g}x | {r['goodput']:.3f} ({r['goodput_min']:.3f}-{r['goodput_max']:.3f}) "
            f"| {r['slo_met']:.0%} | {r['ttft_p50_ms']:,.0f} | {r['tpot_mean_ms']:,.0f} | {r['passes']} |"
        )
    lines += ["", "| adaptive arm | load | against | ratio | ranges apart |", "|---|---:|---|---:|---|"]
    for v in summary["verdicts"]:
        lines.append(
            f"| {v['adaptive']} | {v['rate']:g}x | {v['against']} | {v['ratio']:.2f}x | {_apart(v['apart'])} |"
        )
    return "\n".join(lines) + "\n"


def _apart(apart: bool | None) -> str:
    return "n/a (under 3 passes)" if apart is None else "yes" if apart else "no"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adaptive", description=__doc__.splitlines()[0])
    add_options(parser, AdaptiveOptions)
    opts_args, rest = parser.parse_known_args(argv)
    opts = from_options(AdaptiveOptions, opts_args)
    out = Path(opts.out)
    passes = []
    for i in range(1 if opts.simulate else opts.repeats):
        run_dir = out / f"pass{i + 1}"
        common = [*rest, "--configs", opts.configs, "--rates", opts.rates, "--out", str(run_dir)]
        if opts.simulate:
            from disagg.sim.run import main as simulate

            simulate(common)
        else:
            from bench.compare import main as compare

            compare(common)
        passes.append(json.loads((run_dir / "result.json").read_text())["runs"])
    summary = summarize(passes, opts.configs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"argv": argv, **summary}, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
