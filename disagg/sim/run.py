"""Replay a workload through a simulated cluster (real router, block pools, schedulers; modelled step times)
and report it exactly like a real run: `disagg bench simulate`.

    disagg bench simulate --trace mooncake_conversation_trace.jsonl --configs agg-rr=0x16:round_robin,\\
        disagg-kv=4x12:kv --time-model bench/results/time_model.json --rates 1,2,4
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from disagg.options import add_options, from_options
from disagg.protocol import Request, TokenDelta
from disagg.router.admission import AdmissionConfig
from disagg.sim.cluster import SimCluster, SimClusterConfig, sampling_for
from disagg.sim.faults import SimChaos, window_goodput
from disagg.sim.options import SimOptions, add_sim_args, sim_options
from disagg.sim.planner import SimPlanner
from disagg.sim.spec import ClusterSpec, parse_configs
from disagg.sim.timemodel import StepTimeModel
from disagg.workload.metrics import SLO, RequestRecord, compute_metrics, parse_slos
from disagg.workload.options import add_workload_args, load_workload
from disagg.workload.record import TraceRequest, TraceScale, send_units
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
    loop = cluster.loop
    units = send_units(trace)
    t0 = min(r.timestamp_ms for r in trace)
    records: dict[int, RequestRecord] = {}
    bar = tqdm(total=len(trace), desc="simulate", unit="req", disable=not progress, leave=False)
    limit = config.max_model_len - 1

    def send(unit: list[int], k: int) -> None:
        i = unit[k]
        req = trace[i]
        prompt = scale.prompt(req, config.vocab_size, salt=i)[:limit]
        max_tokens = max(1, min(scale.output_len(req), config.max_model_len - len(prompt)))
        record = RequestRecord(i, len(prompt), max_tokens, loop.now, req.session_id, req.turn)
        records[i] = record
        last = [loop.now]

        def on_token(now: float, delta: TokenDelta) -> None:
            if record.ttft_s is None:
                record.ttft_s = now - record.start_s
                record.cached_tokens = delta.num_cached_tokens  # what the API reports as cached_tokens
            else:
                record.itl_s.append(now - last[0])
            last[0] = now
            record.output_tokens += len(delta.token_ids)
            if delta.finished:
                record.e2e_s = now - record.start_s  # (the router's SLO window is the Flight's RecordLatency)
                bar.update(1)
                if k + 1 < len(unit):
                    nxt = trace[unit[k + 1]]
                    loop.at(now + scale.seconds(nxt.think_time_ms), lambda: send(unit, k + 1))

        hints = config.session_hints and req.session_id is not None  # what `bench replay --session-hints` sends
        request = Request(
            f"r{i}",
            prompt,
            sampling_for(max_tokens),
            session_id=req.session_id if hints else None,
            kv_retention_s=config.kv_retention_s if hints else None,
            priority=req.priority,
        )

        def on_reject(now: float, exc: Exception) -> None:  # a 429, as the replay records it
            record.error = f"HTTP 429: {exc}"
            record.refused_s, record.refusal_code = now - record.start_s, getattr(exc, "code", None)
            bar.update(1)
            if k + 1 < len(unit):
                nxt = trace[unit[k + 1]]
                loop.at(now + scale.seconds(nxt.think_time_ms), lambda: send(unit, k + 1))

        cluster.submit(
            request,
            on_token,
            session=req.session_id if hints else None,
            on_reject=on_reject,
            tenant=req.tenant or "default",
            priority=req.priority,
        )

    for n, unit in enumerate(units):
        at = n / arrival_rate if arrival_rate else scale.seconds(trace[unit[0]].timestamp_ms - t0)
        loop.at(at, functools.partial(send, unit, 0))
    if planner is not None:
        planner.start()
    cluster.run()
    bar.close()
    missing = [
        i for i in range(len(trace)) if i not in records or (records[i].e2e_s is None and records[i].error is None)
    ]
    for i in missing:  # cannot happen unless a request can never fit; reported, not hidden
        records.setdefault(i, RequestRecord(i, 0, 0, 0.0)).error = "never completed in simulation"
    ends = [r.start_s + r.e2e_s for r in records.values() if r.e2e_s is not None]
    counters: dict[str, Any] = dict(
        cluster.counters,
        workers=len(cluster.workers),
        killed=victims,
        staleness=cluster.staleness_summary(),
        busy_fraction=sum(w.busy_seconds for w in cluster.workers) / (len(cluster.workers) * max(ends)),
        preemptions=sum(w.engine.scheduler.stats.num_preemptions for w in cluster.workers),
    )
    if planner is not None:
        counters["role_changes"] = [e.__dict__ for e in planner.timeline]
        counters["final_split"] = [len(cluster.prefill), len(cluster.decode)]
    return SimResult([records[i] for i in sorted(records)], max(ends), cluster.prefix_cache(), counters)


def sim_config(spec: ClusterSpec, args: argparse.Namespace, model: StepTimeModel, slo: SLO) -> SimClusterConfig:
    """The simulated cluster for one config spec, sized like the real one (`disagg serve` / `bench compare`)."""
    opts = sim_options(args)
    cpu_mb = opts.cpu_tier_mb if spec.cpu_tier_mb is None else spec.cpu_tier_mb  # as `disagg serve`
    config = SimClusterConfig(
        num_prefill=spec.num_prefill,
        num_decode=spec.num_decode,
        policy=spec.policy_config(),
        num_blocks=opts.num_blocks_for(model.bytes_per_block),
        max_model_len=opts.max_model_len,
        max_num_batched_tokens=opts.max_num_batched_tokens,
        vocab_size=args.vocab_size,
        cpu_tier_blocks=opts.tier_blocks(cpu_mb, model.bytes_per_block),
        disk_tier_blocks=opts.tier_blocks(opts.disk_tier_mb, model.bytes_per_block) if cpu_mb else 0,
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


def add_machine(config: SimClusterConfig, opts: SimOptions) -> SimClusterConfig:
    """What the shared machine adds (bench/sim/machine.py's measurements, `--machine-model`); an explicit
    --request-overhead-ms wins over the measured one."""
    config.request_overhead_s = opts.request_overhead_ms / 1000
    if not opts.machine_model:
        return config
    measured = json.loads(Path(opts.machine_model).read_text())
    cluster = measured["cluster"]
    config.corun_slowdown = measured.get("corun", {}).get("corun_slowdown", 1.0)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg bench simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="agg-rr=0x16:round_robin,agg-kv=0x16:kv,disagg-kv=4x12:kv")
    parser.add_argument("--rates", default="1", help="load levels: multipliers on the trace's pace")
    add_sim_args(parser)
    add_options(parser, SLO, prefix="slo-")
    parser.add_argument("--extra-slos", default="5000/500", help="more TTFT_MS/TPOT_MS pairs to report goodput at")
    parser.add_argument("--out", default="bench/results/simulate")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--kill-fraction",
        type=float,
        default=0.0,
        help="chaos: kill this fraction of the workers at --kill-at (0: no chaos)",
    )
    parser.add_argument("--kill-at", type=float, default=60.0, help="chaos: virtual seconds into the run")
    parser.add_argument("--detect-s", type=float, default=SimChaos.detect_s)
    parser.add_argument("--restart-s", type=float, default=SimChaos.restart_s)
    parser.add_argument(
        "--chaos-result",
        default="",
        help="take --detect-s / --restart-s from a `disagg bench chaos` result.json (SIGKILL medians)",
    )
    add_workload_args(parser)
    args = parser.parse_args(argv)
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
            chaos = None
            if args.kill_fraction > 0 and args.chaos_result:
                chaos = SimChaos.measured(
                    args.chaos_result, kill_fraction=args.kill_fraction, at_s=args.kill_at, seed=args.seed
                )
            elif args.kill_fraction > 0:
                chaos = SimChaos(args.kill_fraction, args.kill_at, args.detect_s, args.restart_s, args.seed)
            result = simulate(trace, rate_scale, cfg, model, progress=not args.no_progress, chaos=chaos)
            m = result.metrics(slo, parse_slos(args.extra_slos))
            if chaos is not None:  # the same windows of the same run without faults, for reference
                m["chaos"] = window_goodput(result.records, chaos, slo, result.duration_s)
                clean = simulate(trace, rate_scale, cfg, model)
                m["chaos_baseline"] = window_goodput(clean.records, chaos, slo, result.duration_s)
                print(
                    f"[{spec.name}] chaos: killed {result.counters['killed']}, migrations "
                    f"{result.counters.get('migrations', 0)}; goodput before/during/after "
                    + " / ".join(f"{w['goodput']:.2f}" for w in m["chaos"].values())
                    + " (no faults: "
                    + " / ".join(f"{w['goodput']:.2f}" for w in m["chaos_baseline"].values())
                    + ")",
                    flush=True,
                )
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
