"""Cluster-level check of the simulator: the same workloads, loads and configurations on the real cluster (Ray,
HTTP, this machine's cores) and in the simulator (calibrated time model, the workers sharing the same cores),
side by side: TTFT p50 / p90 and goodput, their ratios, and whether both rank the configurations alike.

    .venv/bin/python -m bench.sim.validate --time-model bench/results/time_model.json --out bench/results/validate

Real runs on 2 shared cores are noisy (10-40% between two runs of one configuration), so `--repeats N` runs each
real point N times and `--prior ROWS.json[@CONFIG+CONFIG]` adds the real samples of earlier runs; a point's real
figure is then the median of its samples, reported with their range.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.compare import run_one
from bench.replay import ReplayConfig
from bench.stages import load_spans, per_request
from disagg.config import EngineConfig
from disagg.options import add_options, from_options
from disagg.sim.options import add_sim_args
from disagg.sim.run import sim_config, simulate
from disagg.sim.spec import ClusterSpec, parse_configs
from disagg.sim.timemodel import StepTimeModel
from disagg.workload import agent, loaders
from disagg.workload.metrics import SLO
from disagg.workload.options import WorkloadOptions
from disagg.workload.record import TraceScale


@dataclass
class ValidateOptions:
    """The validation's own options (the simulated cluster's come from SimOptions, the SLO from SLO)."""

    configs: str = field(
        default="agg-kv=0x2:kv,disagg-kv=1x1:kv,dynamic=1x1:kv:planner=1", metadata={"help": "name=PxD:policy,..."}
    )
    rates: str = field(default="1,2", metadata={"help": "load levels: multipliers on the workloads' pace"})
    sessions: int = field(default=8, metadata={"help": "agent sessions"})
    session_rate: float = field(default=0.2, metadata={"help": "agent sessions per second"})
    conv_limit: int = field(default=40, metadata={"help": "first N requests of the conversation trace"})
    conv_time_scale: float = field(default=0.1, metadata={"help": "replay pace of the conversation trace"})
    only: str = field(default="agent,conversation", metadata={"help": "workloads to validate on"})
    out: str = field(default="bench/results/validate", metadata={"help": "output directory"})
    planned: bool = field(
        default=False,
        metadata={
            "help": "add 'planned': the static split the simulator ranks first "
            "at that point (as `disagg plan` would), started with the planner on"
        },
    )
    run: str = field(
        default="",
        metadata={
            "help": "configurations to run for real (default: all); the others take their samples from --prior only"
        },
    )
    repeats: int = field(default=1, metadata={"help": "real runs per point (their median is compared)"})
    prior: list[str] = field(
        default_factory=list,
        metadata={
            "nargs": "append",
            "help": "ROWS.json[@CONFIG+CONFIG]: earlier real samples to add to each point (only the named "
            "configurations); repeatable",
        },
    )
    trace: bool = field(
        default=False,
        metadata={
            "help": "trace the real runs (spans under --out/spans) and compare "
            "TTFT per prefill path: remote and local requests apart"
        },
    )
    resim: str = field(
        default="", metadata={"help": "rows.json of an earlier run: reuse its real results, simulate again"}
    )
    fit: str = field(
        default="",
        metadata={
            "help": "WORKLOAD:RATE:CONFIG - fit --request-overhead-ms and --step-slowdown "
            "on that one real run (grid search), then check every other run with them"
        },
    )


KEYS = ("median_ttft_ms", "p90_ttft_ms", "request_goodput")


def workloads(args: argparse.Namespace) -> dict[str, tuple[list, TraceScale]]:
    cap = dict(max_input_tokens=args.max_model_len - 257, max_output_tokens=256)
    conv = loaders.load("mooncake_conversation_trace.jsonl", args.conv_limit)
    sessions = agent.generate(agent.parse_mix("coding_agent"), args.sessions, args.session_rate, seed=0)
    return {
        "agent": (sessions, TraceScale(block_tokens=EngineConfig.block_size, **cap)),
        "conversation": (
            conv,
            TraceScale(block_tokens=EngineConfig.block_size, time_scale=args.conv_time_scale, **cap),
        ),
    }


def fit_overheads(
    trace: list,
    scale: TraceScale,
    spec: Any,
    args: argparse.Namespace,
    model: StepTimeModel,
    slo: SLO,
    real: dict[str, float],
) -> tuple[float, float]:
    """Grid search of (request overhead ms, step slowdown) minimising the summed |log(sim / real)| of TTFT p50,
    TTFT p90 and goodput on one real run."""
    import math

    best = (float("inf"), 0.0, 1.0)
    for overhead in (0, 50, 100, 150, 200, 250, 300, 400):
        for slowdown in (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5):
            args.request_overhead_ms, args.step_slowdown = overhead, slowdown
            sim = simulate(trace, scale, sim_config(spec, args, model, slo), model).metrics(slo)
            err = sum(abs(math.log(max(sim[k], 1e-9) / max(real[k], 1e-9))) for k in KEYS)
            best = min(best, (err, overhead, slowdown))
    return best[1], best[2]


def prior_samples(specs: list[str]) -> dict[tuple[str, float, str], list[dict[str, Any]]]:
    """Real samples of earlier validate runs: `path` or `path@config+config` (only those configurations: a
    configuration whose code changed since must not be mixed in)."""
    samples: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for spec in specs:
        path, _, names = spec.partition("@")
        keep = set(names.split("+")) if names else None
        for r in json.loads(Path(path).read_text()):
            if keep is None or r["config"] in keep:
                got = r.get("real_samples") or [dict(r["real"], role_changes=r.get("role_changes_real"))]
                samples.setdefault((r["workload"], r["rate"], r["config"]), []).extend(got)
    return samples


def median_of(samples: list[dict[str, Any]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in KEYS}


def dynamic_line(group: list[dict[str, Any]]) -> list[str]:
    """Dynamic against the best static configuration: medians, and whether the samples' ranges overlap (if they
    do, this many runs cannot tell the two apart)."""
    dyn = [r for r in group if r["dynamic"]]
    static = [r for r in group if r not in dyn]
    if not dyn or not static:
        return []
    best = max(static, key=lambda r: r["real"]["request_goodput"])
    return [line for d in dyn for line in _against(d, best)]


def _against(d: dict[str, Any], b: dict[str, Any]) -> list[str]:
    d_good = [s["request_goodput"] for s in d["real_samples"]]
    b_good = [s["request_goodput"] for s in b["real_samples"]]
    overlap = min(d_good) <= max(b_good) and min(b_good) <= max(d_good)
    ratio = d["real"]["request_goodput"] / b["real"]["request_goodput"] if b["real"]["request_goodput"] else None
    head = f"  {d['config']} (starts {d.get('split', '?')}) / best static ({b['config']}) median goodput: "
    return [
        head + (f"{ratio:.2f}x" if ratio is not None else "n/a (best static goodput 0)"),
        f"  ranges {'overlap' if overlap else 'apart'}: {d['config']} {min(d_good):.3f}-{max(d_good):.3f}, "
        f"{b['config']} {min(b_good):.3f}-{max(b_good):.3f}",
    ]


def remote_by_index(records: list, spans_dir: str) -> dict[int, bool]:
    """Whether the real router prefilled each request remotely, from the run's spans (bench/stages.py)."""
    traced = per_request(load_spans(spans_dir))
    return {r.index: traced[r.request_id]["remote"] for r in records if r.ok and r.request_id in traced}


def per_request_ratio(
    samples: list[dict[str, Any]],
    sim_ttft: dict[int, float | None],
    remote: bool | None = None,
    key: str = "ttft_by_index",
) -> float | None:
    """Median over requests of simulated / real TTFT, request by request (the same trace index), then the median
    over real runs: unlike the ratio of two medians, it does not jump when a two-humped TTFT distribution (local
    prefills fast, remote ones slower) puts its median in the gap between the humps.  With `remote`, only the
    requests the real router sent that way (traced runs).  `key`: "e2e_by_index" compares E2E the same way.
    None when no real run recorded its requests."""
    ratios = []
    for sample in samples:
        real = {int(i): t for i, t in (sample.get(key) or {}).items()}
        if remote is not None:
            paths = {int(i): r for i, r in (sample.get("remote_by_index") or {}).items()}
            real = {i: t for i, t in real.items() if paths.get(i) is remote}
        pairs = [sim_ttft[i] / t for i, t in real.items() if t and sim_ttft.get(i)]
        if pairs:
            ratios.append(statistics.median(pairs))
    return statistics.median(ratios) if ratios else None


ERROR_BOUND = 0.2  # the simulator's goal: per-request TTFT / E2E medians and goodput within 20% of real
CHECKED_BELOW = 0.95  # ... at every point where fewer requests than this meet the SLO (the others say nothing)


def attainment(samples: list[dict[str, Any]]) -> float | None:
    """Median over real runs of the share of requests meeting every SLO."""
    got = [s["slo_attainment"] for s in samples if s.get("slo_attainment") is not None]
    return statistics.median(got) if got else None


def verdict(row: dict[str, Any]) -> str:
    """'within' / 'OUTSIDE' the 20% goal at a point the goal covers (SLO attainment below 95%), else 'n/a'."""
    att = row.get("slo_attainment_real")
    if att is None or att >= CHECKED_BELOW:
        return "n/a"
    ratios = [row.get("per_request_ttft_ratio"), row.get("per_request_e2e_ratio"), row["ratio"]["request_goodput"]]
    ok = all(r is not None and abs(r - 1) <= ERROR_BOUND for r in ratios)
    return "within" if ok else "OUTSIDE"


def ranking(rows: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(rows, key=lambda name: -rows[name]["request_goodput"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.sim.validate", description=__doc__.splitlines()[0])
    add_options(
        p, ValidateOptions, only=("configs", "rates", "sessions", "session_rate", "conv_limit", "conv_time_scale")
    )
    add_options(p, SLO, prefix="slo-")
    add_options(p, WorkloadOptions, only=("vocab_size",))
    add_options(
        p, ValidateOptions, skip=("configs", "rates", "sessions", "session_rate", "conv_limit", "conv_time_scale")
    )
    add_sim_args(p)
    args = p.parse_args(argv)
    if not args.cores:
        args.cores = 2  # this machine: the real workers share 2 cores
    model = StepTimeModel.load(args.time_model) if args.time_model else StepTimeModel()
    slo = from_options(SLO, args, prefix="slo-")
    specs = parse_configs(args.configs)
    from disagg.model_store import default_model_dir

    engine = {
        "model": str(default_model_dir()),
        "kv_cache_memory_mb": args.kv_cache_mb,
        "max_model_len": args.max_model_len,
        "num_threads": args.threads,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    stored = (
        {(r["workload"], r["rate"], r["config"]): r for r in json.loads(Path(args.resim).read_text())}
        if args.resim
        else {}
    )
    prior = prior_samples(args.prior)
    loads = workloads(args)
    if args.fit:
        fit_workload, fit_rate, fit_config = args.fit.split(":")
        trace, scale = loads[fit_workload]
        spec = next(s for s in specs if s.name == fit_config)
        real_row = stored[(fit_workload, float(fit_rate), fit_config)]["real"]
        args.request_overhead_ms, args.step_slowdown = fit_overheads(
            trace, replace(scale, time_scale=scale.time_scale * float(fit_rate)), spec, args, model, slo, real_row
        )
        print(
            f"fitted on {args.fit}: request overhead {args.request_overhead_ms:.0f} ms, step slowdown "
            f"{args.step_slowdown:.2f}",
            flush=True,
        )
    for wname, (trace, scale) in loads.items():
        if wname not in args.only.split(","):
            continue
        for rate in (float(r) for r in args.rates.split(",")):
            rscale = replace(scale, time_scale=scale.time_scale * rate)
            simulated: dict[str, dict[str, Any]] = {}
            order: list[ClusterSpec | None] = [*specs, None] if args.planned else [*specs]
            for entry in order:
                if entry is None:  # after the static configurations: start from the simulator's first choice
                    best = max((s for s in specs if not s.planner), key=lambda s: simulated[s.name]["request_goodput"])
                    spec = replace(best, name="planned", planner=True)
                    print(f"{wname} {rate:g}x: planned start {best.name} ({best.num_prefill}x{best.num_decode})")
                else:
                    spec = entry
                key = (wname, rate, spec.name)
                samples = list(prior.get(key, []))
                if key in stored:
                    samples = stored[key].get("real_samples") or [stored[key]["real"]]
                else:
                    for _ in range(args.repeats if not args.run or spec.name in args.run.split(",") else 0):
                        cfg = ReplayConfig(url="", scale=rscale, progress=False, vocab_size=args.vocab_size)
                        spans = (
                            str(out / "spans" / f"{wname}-{rate:g}x-{spec.name}-{len(samples)}") if args.trace else None
                        )
                        result = run_one(spec, engine, trace, cfg, slo=slo, trace_dir=spans)
                        metrics = result.metrics(slo)
                        samples.append(
                            {
                                **{k: metrics[k] for k in KEYS},
                                "role_changes": result.role_changes,
                                "ttft_by_index": {r.index: r.ttft_s for r in result.records if r.ok},
                                "e2e_by_index": {r.index: r.e2e_s for r in result.records if r.ok},
                                "slo_attainment": metrics["goodput_fraction"],
                                "remote_by_index": remote_by_index(result.records, spans) if spans else {},
                            }
                        )
                changes = [s.get("role_changes") for s in samples]
                sim_result = simulate(trace, rscale, sim_config(spec, args, model, slo), model)
                sim = sim_result.metrics(slo)
                sim_ttft = {r.index: r.ttft_s for r in sim_result.records if r.ok}
                per_request = per_request_ratio(samples, sim_ttft)
                per_path = {
                    path: per_request_ratio(samples, sim_ttft, remote=path == "remote") for path in ("remote", "local")
                }
                simulated[spec.name] = sim
                real = median_of(samples)
                row = {
                    "workload": wname,
                    "rate": rate,
                    "config": spec.name,
                    "fitted_on": f"{wname}:{rate:g}:{spec.name}" == args.fit.replace(".0:", ":") if args.fit else False,
                    "real": {k: real[k] for k in KEYS},
                    "sim": {k: sim[k] for k in KEYS},
                    "ratio": {k: sim[k] / real[k] if real[k] else None for k in KEYS},
                    "real_samples": samples,
                    "role_changes_real": changes,
                    "per_request_ttft_ratio": per_request,
                    "per_request_e2e_ratio": per_request_ratio(
                        samples, {r.index: r.e2e_s for r in sim_result.records if r.ok}, key="e2e_by_index"
                    ),
                    "slo_attainment_real": attainment(samples),
                    "per_path_ttft_ratio": per_path,
                    "split": f"{spec.num_prefill}x{spec.num_decode}",
                    "dynamic": spec.planner,
                    "sim_settings": {
                        "request_overhead_ms": args.request_overhead_ms,
                        "step_slowdown": args.step_slowdown,
                        "machine_model": args.machine_model,
                    },
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                (out / "rows.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| workload | load | config | real runs | TTFT p50 real / sim | TTFT p90 real / sim | goodput real "
        "(range) / sim | per-request TTFT / E2E sim / real | SLO attainment (real) | within 20%? |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        a, b = r["real"], r["sim"]
        good = [s["request_goodput"] for s in r["real_samples"]]
        pr, pe, att = r.get("per_request_ttft_ratio"), r.get("per_request_e2e_ratio"), r.get("slo_attainment_real")
        lines.append(
            f"| {r['workload']} | {r['rate']:g}x | {r['config']} | {len(good)} | "
            f"{a['median_ttft_ms']:,.0f} / {b['median_ttft_ms']:,.0f} | {a['p90_ttft_ms']:,.0f} / "
            f"{b['p90_ttft_ms']:,.0f} | {a['request_goodput']:.3f} ({min(good):.3f}-{max(good):.3f}) / "
            f"{b['request_goodput']:.3f} | {'-' if pr is None else f'{pr:.2f}'} / {'-' if pe is None else f'{pe:.2f}'}"
            f" | {'-' if att is None else f'{att:.0%}'} | {verdict(r)} |"
        )
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["rate"]), []).append(r)
    for (wname, rate), group in groups.items():
        real_rank = ranking({r["config"]: r["real"] for r in group})
        sim_rank = ranking({r["config"]: r["sim"] for r in group})
        lines.append(
            f"\n{wname} {rate:g}x: real ranking {real_rank}, simulated {sim_rank}"
            f"{' (same)' if real_rank == sim_rank else ' (DIFFERENT)'}"
        )
        lines.extend(dynamic_line(group))
        for r in group:
            paths = {k: v for k, v in (r.get("per_path_ttft_ratio") or {}).items() if v is not None}
            if paths:
                lines.append(
                    f"  {r['config']}: per-request TTFT sim / real by the real router's path: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in paths.items())
                )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
