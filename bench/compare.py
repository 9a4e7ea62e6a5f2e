"""Configuration sweep: replay one workload against several cluster configurations that this harness starts
itself (aggregated round-robin, aggregated kv-routing, disaggregated kv-routing at P:D ratios), at one or more
load levels, and write one comparison report (JSON, markdown, TTFT CDF, goodput vs rate, per-config bars).

Every (configuration, load) run gets a fresh cluster, so no run inherits another's prefix cache.

    disagg bench compare --agent coding_agent --sessions 12 --configs agg-rr=0x2:round_robin,disagg-kv=1x1:kv
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import stages
from bench.replay import ReplayResult, add_replay_args, replay, replay_config
from bench.session_hits import next_turn_hits
from disagg.config import LAB_KV_CACHE_MB, EngineConfig
from disagg.options import add_options, from_options
from disagg.sim.spec import ClusterSpec, parse_configs
from disagg.workload.metrics import SLO, RequestRecord, parse_slos
from disagg.workload.options import load_workload
from disagg.workload.report import write_report

DEFAULT_CONFIGS = "agg-rr=0x2:round_robin,agg-kv=0x2:kv,disagg-kv=1x1:kv"


@dataclass
class CompareOptions:
    """`disagg bench compare`'s own options (the engine's come from EngineConfig, the replay's from bench.replay)."""

    configs: str = field(default=DEFAULT_CONFIGS, metadata={"help": "name=PxD:policy,..."})
    rates: str = field(default="1", metadata={"help": "load levels: multipliers on the trace's pace, e.g. 0.5,1,2"})
    threads: int = field(default=1, metadata={"help": "torch threads per worker"})
    out: str = field(default="bench/results/compare", metadata={"help": "output directory"})
    trace_dir: str | None = field(
        default=None,
        metadata={"help": "trace every request (spans as JSON lines here) and add a per-stage breakdown"},
    )


def run_one(
    spec: ClusterSpec,
    engine: dict[str, Any],
    trace: list,
    replay_cfg,
    warmup: bool = True,
    trace_dir: str | None = None,
    slo: Any = None,
) -> ReplayResult:
    import shutil
    import tempfile

    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.planner.policy import PlannerConfig
    from disagg.tracing import TracingConfig

    disk_root = tempfile.mkdtemp(prefix="compare-kv-")
    tracing = TracingConfig(file_dir=trace_dir) if trace_dir else None
    planner = spec.planner_config(slo)
    service = Service(
        ClusterConfig(
            num_prefill=spec.num_prefill,
            num_decode=spec.num_decode,
            engine=EngineConfig(**{**engine, "prefill_chunk_target_ms": spec.chunk_target_ms(slo)}),
            tiers=spec.tiers(disk_root),
            tracing=tracing,
        ),
        RouterConfig(policy=spec.policy_config(slo), planner=planner or PlannerConfig()),
    )
    try:
        if warmup:  # one tiny request per worker pays first-call costs outside the measurement
            _warm(service.url, replay_cfg.vocab_size, spec.workers)
        cfg = replace(replay_cfg, url=service.url, session_hints=replay_cfg.session_hints or spec.hints)
        result = asyncio.run(replay(trace, cfg))
        if spec.planner:
            import httpx

            result.role_changes = httpx.get(f"{service.url}/admin/roles", timeout=30).json()["changes"]
        return result
    finally:
        service.shutdown()
        shutil.rmtree(disk_root, ignore_errors=True)


def _warm(url: str, vocab_size: int, n: int) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for i in range(n):
            prompt = [(1000 + 7 * i + j) % vocab_size for j in range(40)]
            client.post(
                "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2, "ignore_eos": True}
            ).raise_for_status()


def model_vocab_size(model_dir: str) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disagg bench compare", description=__doc__.splitlines()[0])
    add_options(parser, CompareOptions, only=("configs", "rates"))
    add_options(
        parser,
        EngineConfig,
        only=("model", "kv_cache_memory_mb", "max_model_len"),
        defaults={"kv_cache_memory_mb": LAB_KV_CACHE_MB},  # several workers on one machine
    )
    add_options(parser, CompareOptions, skip=("configs", "rates"))
    add_replay_args(parser)
    args = parser.parse_args(argv)
    specs = parse_configs(args.configs)
    rates = [float(r) for r in args.rates.split(",")]

    import ray

    from disagg.model_store import default_model_dir

    model = args.model or str(default_model_dir())
    args.vocab_size = model_vocab_size(model)
    if args.max_input_tokens is None:  # keep prompt + output inside the context; longer prompts keep their prefix
        args.max_input_tokens = args.max_model_len - (args.max_output_tokens or 256) - 1
    if args.max_output_tokens is None:
        args.max_output_tokens = 256
    trace, scale, workload = load_workload(args)
    engine = {
        "model": model,
        "kv_cache_memory_mb": args.kv_cache_memory_mb,
        "max_model_len": args.max_model_len,
        "num_threads": args.threads,
    }
    slo = from_options(SLO, args, prefix="slo-")
    runs: list[dict[str, Any]] = []
    records: dict[str, list[RequestRecord]] = {}
    try:
        for rate in rates:
            rate_scale = replace(scale, time_scale=scale.time_scale * rate)
            cfg = replay_config(args, "", rate_scale)
            if cfg.arrival != "trace":
                cfg = replace(cfg, rate=args.rate * rate)
            for spec in specs:
                label = spec.name if len(rates) == 1 else f"{spec.name} @{rate:g}x"
                t0 = time.perf_counter()
                trace_dir = str(Path(args.trace_dir) / label.replace(" ", "_")) if args.trace_dir else None
                result = run_one(spec, engine, trace, cfg, trace_dir=trace_dir, slo=slo)
                metrics = result.metrics(slo, parse_slos(args.extra_slos))
                if trace_dir:
                    time.sleep(1.0)  # the span files are written by background exporters
                    metrics["stages"] = stages.breakdown(result.records, stages.load_spans(trace_dir))
                if result.role_changes is not None:
                    metrics["role_changes"] = result.role_changes
                sessions = next_turn_hits(trace, rate_scale, result.records, args.vocab_size)
                if sessions is not None:
                    metrics["next_turn"] = sessions
                runs.append(
                    {
                        "label": label,
                        "config": spec.name,
                        "rate": rate,
                        "prefill_workers": spec.num_prefill,
                        "decode_workers": spec.num_decode,
                        "policy": spec.policy_settings(),
                        "metrics": metrics,
                    }
                )
                records[label] = result.records
                turn_hit = f", next-turn hit {sessions['hit_ratio']:.1%}" if sessions else ""
                print(
                    f"[{label}] {metrics['completed']}/{metrics['num_prompts']} ok, goodput "
                    f"{metrics['request_goodput']:.3f} req/s, TTFT p50 {metrics['median_ttft_ms']:.0f} ms"
                    f"{turn_hit} ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
    finally:
        ray.shutdown()
    meta = {
        "title": f"configuration comparison on {workload['name']}",
        "workload": workload,
        "scale": scale.describe(),
        "settings": {
            "engine": engine,
            "rates": rates,
            "configs": args.configs,
            "arrival": args.arrival,
            "rate": args.rate,
        },
    }
    paths = write_report(args.out, runs, meta, records)
    staged = {r["label"]: r["metrics"]["stages"] for r in runs if "stages" in r["metrics"]}
    if staged:
        text = "\n\n".join(stages.markdown(label, result) for label, result in staged.items())
        (Path(args.out) / "stages.md").write_text(text + "\n")
        paths["stages"] = stages.plot(staged, Path(args.out) / "stages.png")
        print(text)
    print(paths["markdown"].read_text())
    print(
        json.dumps(
            [
                {"label": r["label"], "goodput": r["metrics"]["request_goodput"], "failed": r["metrics"]["failed"]}
                for r in runs
            ],
            indent=2,
        )
    )
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0 if all(r["metrics"]["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
