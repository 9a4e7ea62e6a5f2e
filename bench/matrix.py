"""The disaggregation matrix (issue: disaggregation that pays, part 4): every workload the machine has offline, at
two prompt-length scales, two SLOs (one where the TPOT objective binds, one where it does not) and several loads,
each run for aggregated serving (round-robin and KV-aware), static splits and the adaptive runtime; one summary
of where the adaptive runtime stands against the best aggregated and the best static configuration per cell.

Each cell is one `bench.adaptive` run: the simulator (`--simulate`, the same router, policy, planner and engine
scheduler code in virtual time; deterministic, one pass) at `--workers` workers, or real clusters.

    .venv/bin/python -m bench.matrix --simulate --workers 16 --out bench/results/matrix_sim16 \\
        --time-model bench/results/time_model.json

Workloads: the Mooncake conversation and synthetic traces (../shared/data/traces) and generated coding-agent
sessions.  The Azure 2023/2024 and BurstGPT traces are not available offline here.  Lengths: a trace's hash
block becomes `block_tokens` tokens, so 128 replays prompts at 1/4 of their length and 512 at full length.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.adaptive import main as adaptive
from disagg.options import add_options, from_options

WORKLOADS = {  # name -> the workload options bench.adaptive passes on
    "conversation": ["--trace", "mooncake_conversation_trace.jsonl"],
    "synthetic": ["--trace", "mooncake_synthetic_trace.jsonl"],
    "agent": ["--agent", "coding_agent"],
}
LENGTHS = {"quarter": "128", "full": "512"}  # tokens per trace hash block (the traces' own: 512)
SLOS = {"tpot-binds": ("5000", "100"), "loose": ("20000", "1000")}  # (TTFT ms, TPOT ms)


@dataclass
class MatrixOptions:
    workers: int = field(default=16, metadata={"help": "workers per configuration"})
    rates: str = field(default="1,2,4,8", metadata={"help": "load levels: multipliers on the workload's pace"})
    limit: int = field(default=1500, metadata={"help": "first N requests of each trace (agent: sessions x turns)"})
    sessions: int = field(default=60, metadata={"help": "agent sessions"})
    pace: float = field(
        default=0.05,
        metadata={
            "help": "replay speed per worker at 1/4 lengths (2 workers: 0.1, the pace the adaptive runs use); the "
            "speed scales with the workers and down with the lengths, so 1x is the same load per worker everywhere"
        },
    )
    workloads: str = field(default=",".join(WORKLOADS), metadata={"help": "comma-separated: " + ", ".join(WORKLOADS)})
    lengths: str = field(default=",".join(LENGTHS), metadata={"help": "comma-separated: " + ", ".join(LENGTHS)})
    slos: str = field(default=",".join(SLOS), metadata={"help": "comma-separated: " + ", ".join(SLOS)})
    simulate: bool = field(default=False, metadata={"help": "the simulator instead of real clusters"})
    out: str = field(default="bench/results/matrix", metadata={"help": "output directory"})
    arms: str = field(
        default="",
        metadata={
            "help": "comma-separated arm names to run (e.g. adaptive,adaptive-split: a policy change re-run against "
            "an earlier matrix's other arms); empty: every arm"
        },
    )
    arm_settings: str = field(
        default="",
        metadata={
            "help": "policy settings added to every arm, colon-separated key=value (e.g. ttft_correction_window=0: "
            "the router's TTFT correction off)"
        },
    )


ADAPTIVE = "kv:adaptive=1:flexible=1:planner=1"  # cost placement, sized chunks, flexible workers, the planner


def configs(workers: int, settings: str = "", only: str = "") -> str:
    """Aggregated (round-robin, KV-aware), static splits at 1/4, 1/2 and 3/4 prefill, and the adaptive runtime
    started aggregated (`adaptive`: the planner splits prefill workers off when it measures prefill interference)
    and from the 1/4 split (`adaptive-split`); `only`: the comma-separated arm names kept (empty: all)."""
    splits = sorted({max(1, min(workers - 1, round(workers * f))) for f in (0.25, 0.5, 0.75)})
    arms = [f"agg-rr=0x{workers}:round_robin", f"agg-kv=0x{workers}:kv"]
    arms += [f"split-{p}x{workers - p}={p}x{workers - p}:kv" for p in splits]
    p = splits[0]
    arms += [f"adaptive=0x{workers}:{ADAPTIVE}", f"adaptive-split={p}x{workers - p}:{ADAPTIVE}"]
    if only:
        by_name = {arm.split("=")[0]: arm for arm in arms}
        kept = set(only.split(","))
        unknown = kept - by_name.keys()
        if unknown:
            raise ValueError(f"--arms: no arm named {', '.join(sorted(unknown))}")
        arms = [arm for name, arm in by_name.items() if name in kept]
    return ",".join(arm + (":" + settings if settings else "") for arm in arms)


def cell_args(opts: MatrixOptions, workload: str, length: str, slo: str, out: Path) -> list[str]:
    ttft, tpot = SLOS[slo]
    block = LENGTHS[length]
    pace = opts.pace * opts.workers * int(LENGTHS["quarter"]) / int(block)
    args = [*WORKLOADS[workload], "--block-tokens", block, "--time-scale", f"{pace:g}"]
    args += ["--slo-ttft-ms", ttft, "--slo-tpot-ms", tpot]
    args += ["--rates", opts.rates, "--configs", configs(opts.workers, opts.arm_settings, opts.arms), "--out", str(out)]
    args += ["--sessions", str(opts.sessions)] if workload == "agent" else ["--limit", str(opts.limit)]
    return args + (["--simulate"] if opts.simulate else [])


def verdicts(out: Path, cells: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    rows = []
    for workload, length, slo in cells:
        summary = json.loads((out / f"{workload}-{length}-{slo}" / "summary.json").read_text())
        for v in summary["verdicts"]:
            rows.append({"workload": workload, "length": length, "slo": slo, **v})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | lengths | SLO | load | adaptive arm | vs best aggregated | vs best static split |",
             "|---|---|---|---:|---|---:|---:|"]  # fmt: skip
    key = lambda r: (r["workload"], r["length"], r["slo"], r["rate"], r.get("adaptive", "adaptive"))  # noqa: E731
    for (workload, length, slo, rate, arm), group in itertools.groupby(sorted(rows, key=key), key=key):
        against = {r["against"].split(" (")[0]: r for r in group}
        cells = [against.get(k) for k in ("best aggregated", "best static split")]
        shown = [_ratio(c) for c in cells]
        lines.append(f"| {workload} | {length} | {slo} | {rate:g}x | {arm} | {shown[0]} | {shown[1]} |")
    return "\n".join(lines) + "\n"


def _ratio(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return "-"
    best = verdict["against"].split("(")[1].rstrip(")")
    if verdict["ratio"] == float("inf"):
        return f"n/a ({best}: none within the SLO)"
    return f"{verdict['ratio']:.2f}x ({best})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.matrix", description=__doc__.splitlines()[0])
    add_options(parser, MatrixOptions)
    args, rest = parser.parse_known_args(argv)  # the rest goes to every cell (e.g. --time-model, --cores)
    opts = from_options(MatrixOptions, args)
    out = Path(opts.out)
    cells = list(itertools.product(*(getattr(opts, k).split(",") for k in ("workloads", "lengths", "slos"))))
    for workload, length, slo in cells:
        adaptive([*rest, *cell_args(opts, workload, length, slo, out / f"{workload}-{length}-{slo}")])
    rows = verdicts(out, cells)
    (out / "summary.json").write_text(json.dumps({"argv": argv, "verdicts": rows}, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(rows))
    print(markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
