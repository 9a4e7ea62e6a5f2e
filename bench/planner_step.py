"""The planner under a load step, in simulation: agent sessions arrive at a base rate, then at twice that rate.
The same run with a static split (by default the best one for this workload, searched to +-1 worker like `disagg
plan`) and with the planner starting from it:
SLO attainment in windows over time, when it is back above 90% after the step, the role changes (and reversals),
and a plot of goodput over time with the role changes marked.

    .venv/bin/python -m bench.planner_step --workers 64 --time-model bench/results/time_model.json \\
        --out bench/results/planner_step
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from disagg.config import EngineConfig
from disagg.options import add_options, from_options
from disagg.planning.search import Search, ranking
from disagg.sim.options import add_sim_args
from disagg.sim.run import sim_config, simulate
from disagg.sim.spec import ClusterSpec
from disagg.sim.timemodel import StepTimeModel
from disagg.workload import agent
from disagg.workload.metrics import SLO, RequestRecord
from disagg.workload.options import WorkloadOptions
from disagg.workload.record import TraceRequest, TraceScale

_PHASE_ID_SHIFT = 100_000_000  # keeps the second phase's private hash_ids apart from the first's


@dataclasses.dataclass
class PlannerStepOptions:
    """The step study's own options (the simulated cluster's come from SimOptions, the SLO from SLO)."""

    workers: int = dataclasses.field(default=64, metadata={"help": "workers the planner may split"})
    start: str = dataclasses.field(
        default="best",
        metadata={"help": "static PxD, also the planner's start (best: the best static split for this workload)"},
    )
    mix: str = dataclasses.field(default="coding_agent:2,deep_research:1,short_chat:1", metadata={"help": "agent mix"})
    rate: float = dataclasses.field(default=2.0, metadata={"help": "sessions/s before the step"})
    factor: float = dataclasses.field(default=2.0, metadata={"help": "load factor of the step"})
    phase_s: float = dataclasses.field(default=120.0, metadata={"help": "seconds before and after the step"})
    window_s: float = dataclasses.field(default=10.0, metadata={"help": "goodput window, s"})
    out: str = dataclasses.field(default="bench/results/planner_step", metadata={"help": "output directory"})


def step_workload(mix: str, rate: float, phase_s: float, factor: float, seed: int = 0) -> list[TraceRequest]:
    """Sessions at `rate`/s for `phase_s`, then at `rate * factor`/s for another `phase_s`."""
    profiles = agent.parse_mix(mix)
    base = agent.generate(profiles, max(1, int(rate * phase_s)), rate, seed)
    started = {r.session_id for r in base if r.turn == 0 and r.timestamp_ms < phase_s * 1000}
    first = [r for r in base if r.session_id in started]  # whole sessions that start before the step
    second = agent.generate(profiles, max(1, int(rate * factor * phase_s)), rate * factor, seed + 1)
    shifted = [
        dataclasses.replace(
            r,
            timestamp_ms=r.timestamp_ms + phase_s * 1000,
            session_id=f"b{r.session_id}",
            hash_ids=[h + _PHASE_ID_SHIFT if h >= 2_000_000_000 else h for h in r.hash_ids],
        )
        for r in second
    ]
    return sorted(first + shifted, key=lambda r: r.timestamp_ms)


def attainment_over_time(records: list[RequestRecord], slo: SLO, window_s: float, end_s: float) -> list[dict]:
    """Per window of arrival time: requests, share meeting both SLOs, goodput (req/s)."""
    out = []
    t = 0.0
    while t < end_s:
        batch = [r for r in records if t <= r.start_s < t + window_s]
        met = sum(r.ok and slo.met(r) for r in batch)
        out.append(
            {
                "t": t,
                "requests": len(batch),
                "attainment": met / len(batch) if batch else None,
                "goodput": met / window_s,
            }
        )
        t += window_s
    return out


def recovery_s(series: list[dict], step_s: float, target: float) -> float | None:
    """Seconds after the step until every later window meets `target` (None: never)."""
    after = [w for w in series if w["t"] >= step_s and w["attainment"] is not None]
    for i, w in enumerate(after):
        if all(x["attainment"] >= target for x in after[i:]):
            return w["t"] - step_s
    return None


def plot(series: dict[str, list[dict]], changes: list[dict], step_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for label, s in series.items():
        ax.plot([w["t"] for w in s], [w["goodput"] for w in s], label=label)
    ax.axvline(step_s, color="black", linestyle="--", label="2x load step")
    for i, c in enumerate(changes):
        ax.axvline(c["time_s"], color="tab:red", alpha=0.35, label="role change (planner)" if i == 0 else None)
    ax.set_xlabel("arrival time (s, simulated)")
    ax.set_ylabel("goodput (req/s meeting both SLOs)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def static_split(
    args: argparse.Namespace, trace: list, scale: TraceScale, model: StepTimeModel, slo: SLO
) -> tuple[int, int]:
    """The static split to compare with: `--start PxD`, or by default the best static split for this very
    workload (the step included), found by `disagg plan`'s search down to +-1 worker."""
    if args.start and args.start != "best":
        prefill, decode = (int(x) for x in args.start.lower().split("x"))
        return prefill, decode
    search = Search(argparse.Namespace(**{**vars(args), "extra_slos": ""}), trace, scale, model, slo)
    best = ranking(list(search.splits(args.workers).values()))[0]
    print(
        f"[static] best static split for the step workload: {best['config']} ({len(search.results)} simulated)",
        flush=True,
    )
    return best["prefill"], best["decode"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.planner_step", description=__doc__.splitlines()[0])
    add_options(p, PlannerStepOptions, skip=("out",))
    add_options(p, SLO, prefix="slo-")
    add_options(p, WorkloadOptions, only=("vocab_size",))
    add_options(p, PlannerStepOptions, only=("out",))
    add_sim_args(p)
    args = p.parse_args(argv)
    model = StepTimeModel.load(args.time_model) if args.time_model else StepTimeModel()
    slo = from_options(SLO, args, prefix="slo-")
    trace = step_workload(args.mix, args.rate, args.phase_s, args.factor)
    scale = TraceScale(
        block_tokens=EngineConfig.block_size, max_input_tokens=args.max_model_len - 257, max_output_tokens=256
    )
    prefill, decode = static_split(args, trace, scale, model, slo)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    series, summary, changes = {}, {}, []
    for label, planner in (("static", False), ("planner", True)):
        spec = ClusterSpec(label, prefill, decode, "kv", planner=planner)
        result = simulate(trace, scale, sim_config(spec, args, model, slo), model)
        end = max(r.start_s for r in result.records) + args.window_s
        s = attainment_over_time(result.records, slo, args.window_s, end)
        series[f"{label} {prefill}x{decode}" + (" + planner" if planner else "")] = s
        m = result.metrics(slo)
        run: dict[str, Any] = {
            "goodput": m["request_goodput"],
            "slo_met": m["goodput_fraction"],
            "recovery_s": recovery_s(s, args.phase_s, 0.9),
            "before_step": [w["attainment"] for w in s if w["t"] < args.phase_s],
        }
        if planner:
            changes = m["sim"].get("role_changes", [])
            run.update(role_changes=changes, final_split=m["sim"].get("final_split"), reversals=_reversals(changes))
        summary[label] = run
        print(
            f"[{label}] goodput {run['goodput']:.2f} req/s, SLO met {run['slo_met']:.0%}, back above 90% "
            f"{run['recovery_s']} s after the step"
            + (f", {len(changes)} role changes, final split {run.get('final_split')}" if planner else ""),
            flush=True,
        )
    plot(series, changes, args.phase_s, out / "planner_step.png")
    (out / "result.json").write_text(
        json.dumps({"summary": summary, "series": series, "settings": vars(args)}, indent=2, default=str)
    )
    return 0


def _reversals(changes: list[dict]) -> dict[str, int]:
    """Per worker: moves back to the role it had just left."""
    last: dict[str, dict] = {}
    out: dict[str, int] = {}
    for c in changes:
        prev = last.get(c["worker"])
        if prev is not None and prev["old"] == c["new"]:
            out[c["worker"]] = out.get(c["worker"], 0) + 1
        last[c["worker"]] = c
    return out


if __name__ == "__main__":
    raise SystemExit(main())
