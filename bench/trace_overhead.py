"""What tracing costs: per request in isolation (microseconds of span work), and end to end on a real cluster
(tracing off vs on at 100% sampling, interleaved rounds of the same workload, in one run): TTFT at a moderate
Poisson rate, and throughput when saturated (the completion rate under far more arrivals than it serves).

    .venv/bin/python -m bench.trace_overhead --rounds 3 --out bench/results/trace_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
from opentelemetry import trace

from bench.common import emit, print_table
from disagg import tracing as tr
from disagg.cluster.spans import WorkerSpans
from disagg.config import LAB_KV_CACHE_MB
from disagg.model_store import DEFAULT_VOCAB_SIZE
from disagg.options import add_options, from_options
from disagg.protocol import Role


@dataclass
class TraceOverheadOptions:
    requests: int = field(default=2000, metadata={"help": "micro benchmark: requests per measurement"})
    rounds: int = field(default=3, metadata={"help": "end to end: interleaved off/on rounds (0: skip)"})
    rate: float = field(default=0.8, metadata={"help": "end to end: requests/s (Poisson)"})
    duration: float = field(default=40.0, metadata={"help": "end to end: seconds of arrivals for TTFT"})
    saturate_rate: float = field(default=6.0, metadata={"help": "end to end: arrivals/s for throughput"})
    saturate_duration: float = field(default=20.0, metadata={"help": "end to end: seconds of arrivals for throughput"})
    prompt_tokens: int = field(default=200, metadata={"help": "prompt tokens per request"})
    output_tokens: int = field(default=16, metadata={"help": "output tokens per request"})
    out: str = field(default="bench/results/trace_overhead.json", metadata={"help": "JSON file the results go to"})


def per_request_cost(tracer: trace.Tracer, worker: WorkerSpans, n: int) -> float:
    """Microseconds of span work per request: the router's three spans + context injection, and a decode
    worker's spans built from a finished sequence (a prefill worker's are fewer)."""
    now = time.monotonic()
    t0 = time.perf_counter()
    for i in range(n):
        root = tracer.start_span(
            "text_completion model",
            kind=trace.SpanKind.SERVER,
            attributes={tr.RESPONSE_ID: f"r{i}", tr.USAGE_INPUT_TOKENS: 200},
        )
        ctx = trace.set_span_in_context(root)
        carrier = tr.inject(root) if root.is_recording() else {}
        tracer.start_span("router.queue", context=ctx).end()
        with tracer.start_as_current_span("router.route", context=ctx):
            pass
        seq = SimpleNamespace(
            trace_context=carrier,
            first_token_time=now + 0.5,
            finish_time=now + 1.0,
            num_prompt_tokens=200,
            num_cached_tokens=0,
            hold_kv=False,
            load_kind="peer",
            load_blocks=13,
            load_failed=False,
            arrival_time=now,
            load_start=now + 0.01,
            load_end=now + 0.02,
            scheduled_time=now + 0.01,
            output_token_ids=[0] * 16,
            num_preemptions=0,
        )
        if worker.enabled:
            worker.record(seq, "length")
        root.end()
    return (time.perf_counter() - t0) / n * 1e6


def micro(n: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        setups = {
            "off (no-op tracer)": tr.TracingConfig(),
            "on, JSON-lines files": tr.TracingConfig(file_dir=d),
            "on, OTLP to a dead collector": tr.TracingConfig(
                otlp_endpoint="http://127.0.0.1:9/v1/traces", export_timeout_s=0.5
            ),
        }
        for name, cfg in setups.items():
            tracer = tr.make_tracer(cfg, "router")
            worker = WorkerSpans("w", Role.DECODE, cfg)
            per_request_cost(tracer, worker, 200)  # warm up
            rows.append(
                {
                    "setting": name,
                    "us_per_request": statistics.median(per_request_cost(tracer, worker, n) for _ in range(3)),
                }
            )
    return rows


def end_to_end(args: TraceOverheadOptions) -> list[dict[str, Any]]:
    import ray

    from bench.compare import _warm
    from bench.overload import open_loop, summarize
    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.config import EngineConfig
    from disagg.model_store import default_model_dir
    from disagg.router.policy import PolicyConfig

    rows = []
    try:
        for r in range(args.rounds):
            for traced in (False, True):
                d = tempfile.mkdtemp(prefix="trace-overhead-")
                svc = Service(
                    ClusterConfig(
                        num_prefill=1,
                        num_decode=1,
                        tiers=None,
                        tracing=tr.TracingConfig(file_dir=d) if traced else None,
                        engine=EngineConfig(
                            model=str(default_model_dir()), kv_cache_memory_mb=LAB_KV_CACHE_MB, num_threads=1
                        ),
                    ),
                    RouterConfig(policy=PolicyConfig(min_remote_prefill_tokens=16)),
                )
                _warm(svc.url, DEFAULT_VOCAB_SIZE, 2)
                model = httpx.get(f"{svc.url}/v1/models").json()["data"][0]["id"]
                shots = asyncio.run(
                    open_loop(
                        svc.url,
                        model,
                        [("default", 0, args.rate)],
                        args.duration,
                        args.prompt_tokens,
                        args.output_tokens,
                        seed=r,
                    )
                )
                s = summarize(shots, args.duration, 1e9, 1e9)
                # saturated: far more arrivals than the cluster serves, so the completion rate is its capacity
                sat = asyncio.run(
                    open_loop(
                        svc.url,
                        model,
                        [("default", 0, args.saturate_rate)],
                        args.saturate_duration,
                        args.prompt_tokens,
                        args.output_tokens,
                        seed=100 + r,
                    )
                )
                rows.append(
                    {
                        "round": r,
                        "tracing": "on" if traced else "off",
                        "completed": s["completed"],
                        "throughput": summarize(sat, args.saturate_duration, 1e9, 1e9)["throughput"],
                        "ttft_p50_ms": s["ttft_p50_ms"],
                        "ttft_p99_ms": s["ttft_p99_ms"],
                    }
                )
                print(rows[-1], flush=True)
                svc.shutdown()
    finally:
        ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, TraceOverheadOptions)
    args = from_options(TraceOverheadOptions, parser.parse_args(argv))
    rows = micro(args.requests)
    print_table(rows, "span work per request")
    result: dict[str, Any] = {"micro": rows, "settings": asdict(args)}
    if args.rounds:
        e2e = end_to_end(args)
        result["end_to_end"] = e2e
        for key in ("throughput", "ttft_p50_ms", "ttft_p99_ms"):
            off = statistics.median(r[key] for r in e2e if r["tracing"] == "off")
            on = statistics.median(r[key] for r in e2e if r["tracing"] == "on")
            result[f"{key}_off"], result[f"{key}_on"] = off, on
        print_table([{k: v for k, v in result.items() if k.endswith(("_off", "_on"))}], "end to end, medians")
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
