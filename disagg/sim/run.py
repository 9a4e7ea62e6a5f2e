"""Replay a workload through a simulated cluster (real router, block pools, schedulers; modelled step times)
and report it exactly like a real run: `disagg bench simulate`.

    disagg bench simulate --trace mooncake_conversation_trace.jsonl --configs agg-rr=0x16:round_robin,\\
        disagg-kv=4x12:kv --time-model bench/results/time_model.json --rates 1,2,4
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disagg.options import add_options, from_options
from disagg.router.admission import AdmissionConfig
from disagg.sim.cluster import SimCluster, SimClusterConfig
from disagg.sim.faults import SimChaos, window_goodput
from disagg.sim.openloop import OpenLoop
from disagg.sim.options import SimOptions, add_sim_args, sim_options
from disagg.sim.planner import SimPlanner
from disagg.sim.spec import ClusterSpec, parse_configs
from disagg.sim.timemodel import StepTimeModel
from disagg.stats import RouterCounters
from disagg.workload.metrics import SLO, RequestRecord, compute_metrics, parse_slos
from disagg.workload.options import add_workload_args, load_workload
from disagg.workload.record import TraceRequest, TraceScale
from disagg.workload.report import write_report


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration_s: float
    prefix_cache: dict[str, float]
    counters: dict[str, Any]

    def metrics(self, slo: SLO, extra_slos: list[SLO] | None = None) -> dict[str, Any]:
        m = compute_metrics(self.records, max(self.duration_s, 1e-9), slo, self.prefix_cache, extra_slos)
        m["sim"] = self.counters
        return m


def simulate(
    trace: list[TraceRequest],
    scale: TraceScale,
    config: SimClusterConfig,
    model: StepTimeModel,
    arrival_rate: float | None = None,
    progress: bool = False,
    chaos: SimChaos | None = None,
) -> SimResult:
    """Open-loop replay in virtual time: requests at the trace's (scaled) timestamps, or at a fixed arrival_rate;
    agent turns wait for the previous turn plus think time, as in bench.replay.  `chaos`: kill workers mid-run."""
    cluster = SimCluster(config, model)
    victims = chaos.schedule(cluster) if chaos is not None else []
    planner = SimPlanner(cluster, config.planner) if config.planner is not None else None
    sender = OpenLoop(trace, scale, cluster, progress)
    sender.start(arrival_rate)
    if planner is not None:
        planner.start()
    cluster.run()
    records = sender.finish()
    ends = [r.start_s + r.e2e_s for r in records if r.e2e_s is not None]
    counters: dict[str, Any] = dict(
        cluster.counters,
        **_router_counts(cluster.router.counters),
        **_prediction_error(cluster.router.latency.prediction_errors),
        workers=len(cluster.workers),
        killed=victims,
        staleness=cluster.staleness_summary(),
        busy_fraction=sum(w.busy_seconds for w in cluster.workers) / (len(cluster.workers) * max(ends)),
        preemptions=sum(w.engine.scheduler.stats.num_preemptions for w in cluster.workers),
    )
    if planner is not None:
        counters["role_changes"] = [e.__dict__ for e in planner.timeline]
        counters["final_split"] = [len(cluster.prefill), len(cluster.decode)]
    return SimResult(records, max(ends), cluster.prefix_cache(), counters)


def _prediction_error(errors: Iterable[float]) -> dict[str, float]:
    """The routing decisions' TTFT predictions against the outcomes: median relative error (absent: none)."""
    errors = list(errors)
    return {"ttft_prediction_error_median": statistics.median(errors)} if errors else {}


def _router_counts(counters: RouterCounters) -> dict[str, int]:
    """What the router counted that the result reports (migrations, fallbacks of any kind), each absent when
    none happened: counted once, on the router's counters, as in a real run."""
    counts = {"migrations": counters.migrations, "fallbacks": sum(counters.fallbacks.values())}
    return {name: n for name, n in counts.items() if n}


def sim_config(spec: ClusterSpec, args: argparse.Namespace, model: StepTimeModel, slo: SLO) -> SimClusterConfig:
    """The simulated cluster for one config spec, sized like the real one (`disagg serve` / `bench compare`)."""
    opts = sim_options(args)
    cpu_mb = opts.cpu_tier_mb if spec.cpu_tier_mb is None else spec.cpu_tier_mb  # as `disagg serve`
    disk_mb = opts.disk_tier_mb if spec.disk_tier_mb is None else spec.disk_tier_mb
    config = SimClusterConfig(
        num_prefill=spec.num_prefill,
        num_decode=spec.num_decode,
        policy=spec.policy_config(slo),
        num_blocks=opts.num_blocks_for(model.bytes_per_block),
        max_model_len=opts.max_model_len,
        max_num_batched_tokens=opts.max_num_batched_tokens,
        prefill_chunk_target_ms=spec.chunk_target_ms(slo),
        vocab_size=args.vocab_size,
        cpu_tier_blocks=opts.tier_blocks(cpu_mb, model.bytes_per_block),
        disk_tier_blocks=opts.tier_blocks(disk_mb, model.bytes_per_block) if cpu_mb else 0,
        session_hints=spec.hints or opts.session_hints,
        planner=spec.planner_config(slo),
        event_delay_s=opts.event_delay_ms / 1000,
        event_jitter_s=opts.event_jitter_ms / 1000,
        cores=opts.cores,
        threads_per_worker=opts.threads,
        step_slowdown=opts.step_slowdown,
        admission=AdmissionConfig() if opts.admission else None,
    )
    return add_machine(config, opts)


def nearest_size(corun: dict[str, Any], workers: int) -> dict[str, Any]:
    """The co-run factors measured in the cluster size nearest `workers` (bench/sim/machine.py measures several;
    a machine model from before holds one set, for any size)."""
    sizes = corun.get("by_workers")
    if not sizes:
        return corun
    return sizes[min(sizes, key=lambda n: (abs(int(n) - workers), -int(n)))]


def add_machine(config: SimClusterConfig, opts: SimOptions) -> SimClusterConfig:
    """What the shared machine adds (bench/sim/machine.py's measurements, `--machine-model`); an explicit
    --request-overhead-ms wins over the measured one."""
    config.request_overhead_s = opts.request_overhead_ms / 1000
    if not opts.machine_model:
        return config
    measured = json.loads(Path(opts.machine_model).read_text())
    cluster = measured["cluster"]
    corun = nearest_size(measured.get("corun", {}), config.num_prefill + config.num_decode)
    config.corun_slowdown = corun.get("corun_slowdown", 1.0)
    config.corun_by_tokens = tuple((int(edge), float(factor)) for edge, factor, *_ in corun.get("by_tokens", []))
    config.busy_factors = tuple((int(k), float(factor)) for k, factor, *_ in corun.get("by_busy", []))
    config.serving_cpu_per_request_s = cluster["serving_cpu_s_per_request"]
    config.serving_cpu_per_token_s = cluster["serving_cpu_s_per_token"]
    config.idle_serving_cores = cluster["idle_serving_cores"]
    if not opts.request_overhead_ms:
        config.request_overhead_s = max(0.0, cluster["request_overhead_ms"]) / 1000
    handoff = measured.get("handoff")
    if handoff is not None:  # the disaggregated path's extra cost (machine.py's 4th measurement)
        config.handoff_overhead_s = max(0.0, handoff["handoff_overhead_ms"]) / 1000
        config.serving_cpu_per_handoff_s = handoff["serving_cpu_s_per_handoff"]
    return config


def _stale(m: dict[str, Any]) -> str:
    st = m["sim"].get("staleness")
    if not st:
        return ""
    return (
        f", staleness exact {st['exact']:.0%} over {st['over_predicted']:.0%} under {st['under_predicted']:.0%}"
        f" (error p1/p50/p99 {st['error_tokens_p1']}/{st['error_tokens_p50']}/{st['error_tokens_p99']} tokens)"
    )


@dataclass
class SimulateOptions:
    """`disagg bench simulate`'s own options (the cluster, workload and SLO ones come from their configs)."""

    configs: str = field(
        default="agg-rr=0x16:round_robin,agg-kv=0x16:kv,disagg-kv=4x12:kv",
        metadata={"help": "clusters to simulate: NAME=PxD:POLICY[:key=value...],... (disagg/sim/spec.py)"},
    )
    rates: str = field(default="1", metadata={"help": "load levels: multipliers on the trace's pace"})
    extra_slos: str = field(default="5000/500", metadata={"help": "more TTFT_MS/TPOT_MS pairs to report goodput at"})
    out: str = field(default="bench/results/simulate", metadata={"help": "report directory"})
    progress: bool = field(default=True, metadata={"help": "a progress bar per run"})
    kill_fraction: float = field(
        default=0.0, metadata={"help": "chaos: kill this fraction of the workers at --kill-at (0: no chaos)"}
    )
    kill_at: float = field(default=60.0, metadata={"help": "chaos: virtual seconds into the run"})
    detect_s: float = field(default=SimChaos.detect_s, metadata={"help": "chaos: seconds until a kill is detected"})
    restart_s: float = field(default=SimChaos.restart_s, metadata={"help": "chaos: seconds until a worker is back"})
    chaos_result: str = field(
        default="",
        metadata={"help": "take --detect-s / --restart-s from a `disagg bench chaos` result.json (SIGKILL medians)"},
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg bench simulate", description=__doc__.splitlines()[0])
    add_options(parser, SimulateOptions, only=("configs", "rates"))
    add_sim_args(parser)
    add_options(parser, SLO, prefix="slo-")
    add_options(parser, SimulateOptions, skip=("configs", "rates"))
    add_workload_args(parser)
    return parser


def _chaos(args: argparse.Namespace) -> SimChaos | None:
    if args.kill_fraction <= 0:
        return None
    if args.chaos_result:
        return SimChaos.measured(args.chaos_result, kill_fraction=args.kill_fraction, at_s=args.kill_at, seed=args.seed)
    return SimChaos(args.kill_fraction, args.kill_at, args.detect_s, args.restart_s, args.seed)


def _with_chaos(
    m: dict[str, Any], result: SimResult, run: Callable[[], SimResult], chaos: SimChaos, slo: SLO, name: str
) -> None:
    """The chaos windows of a faulted run, and the same windows of the same run without faults."""
    m["chaos"] = window_goodput(result.records, chaos, slo, result.duration_s)
    m["chaos_baseline"] = window_goodput(run().records, chaos, slo, result.duration_s)
    print(
        f"[{name}] chaos: killed {result.counters['killed']}, migrations "
        f"{result.counters.get('migrations', 0)}; goodput before/during/after "
        + " / ".join(f"{w['goodput']:.2f}" for w in m["chaos"].values())
        + " (no faults: "
        + " / ".join(f"{w['goodput']:.2f}" for w in m["chaos_baseline"].values())
        + ")",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    trace, scale, workload = load_workload(args)
    model = StepTimeModel.load(args.time_model) if args.time_model else StepTimeModel()
    slo = from_options(SLO, args, prefix="slo-")
    rates = [float(r) for r in args.rates.split(",")]
    runs: list[dict[str, Any]] = []
    records: dict[str, list[RequestRecord]] = {}
    for rate in rates:
        rate_scale = TraceScale(**{**scale.__dict__, "time_scale": scale.time_scale * rate})
        for spec in parse_configs(args.configs):
            cfg = sim_config(spec, args, model, slo)
            t0 = time.perf_counter()
            chaos = _chaos(args)
            result = simulate(trace, rate_scale, cfg, model, progress=args.progress, chaos=chaos)
            m = result.metrics(slo, parse_slos(args.extra_slos))
            if chaos is not None:
                clean = functools.partial(simulate, trace, rate_scale, cfg, model)
                _with_chaos(m, result, clean, chaos, slo, spec.name)
            label = spec.name if len(rates) == 1 else f"{spec.name} @{rate:g}x"
            runs.append(
                {
                    "label": label,
                    "config": spec.name,
                    "rate": rate,
                    "prefill_workers": spec.num_prefill,
                    "decode_workers": spec.num_decode,
                    "policy": spec.policy_settings(),
                    "metrics": m,
                }
            )
            records[label] = result.records
            print(
                f"[{label}] {m['completed']}/{m['num_prompts']} ok, goodput {m['request_goodput']:.3f} req/s, "
                f"TTFT p50 {m['median_ttft_ms']:.0f} ms, hit {m['prefix_cache']['hit_ratio']:.1%}{_stale(m)} "
                f"(simulated {result.duration_s:.0f}s in {time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
    meta = {
        "title": f"simulated comparison on {workload['name']}",
        "workload": workload,
        "scale": scale.describe(),
        "settings": {
            "time_model": model.__dict__,
            "configs": args.configs,
            "rates": rates,
            "num_blocks": sim_options(args).num_blocks_for(model.bytes_per_block),
        },
    }
    paths = write_report(args.out, runs, meta, records)
    print(paths["markdown"].read_text())
    print(json.dumps([{"label": r["label"], "goodput": r["metrics"]["request_goodput"]} for r in runs], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
