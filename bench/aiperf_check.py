"""Cross-check our harness (bench/replay.py) against NVIDIA's AIPerf on the same workload and the same server.

One `disagg serve` is started; a Mooncake-format trace (open loop, fixed schedule, unique prompts, fixed output
length with ignore_eos) is replayed through our harness and then through AIPerf (from its own venv: nothing is
installed into the project's), and TTFT, ITL and output throughput are compared.  AIPerf 0.13.0 cannot load a
tokenizer from a local directory in offline mode, so the model's tokenizer is laid out as an HF hub cache entry
(`models--local--NAME/snapshots/...`) and AIPerf is pointed at it with HF_HOME and HF_HUB_OFFLINE=1.

    python3 -m venv /tmp/aiperfenv && /tmp/aiperfenv/bin/pip install aiperf==0.13.0
    .venv/bin/python -m bench.aiperf_check --aiperf /tmp/aiperfenv/bin/aiperf --out bench/results/aiperf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers import System, start, stop, wait_ready
from bench.replay import ReplayConfig, replay
from disagg.config import EngineConfig
from disagg.options import add_options
from disagg.workload import loaders
from disagg.workload.metrics import SLO
from disagg.workload.record import TraceRequest, TraceScale

REPO = Path(__file__).resolve().parents[1]


@dataclass
class AiperfCheckOptions:
    """The check's own options (the model comes from EngineConfig)."""

    aiperf: str = field(metadata={"help": "the aiperf executable of its own venv"})
    requests: int = field(default=30, metadata={"help": "requests each client sends"})
    interval_ms: float = field(default=3000.0, metadata={"help": "one request every this many ms"})
    input_tokens: int = field(default=256, metadata={"help": "prompt tokens per request"})
    output_tokens: int = field(default=32, metadata={"help": "output tokens per request"})
    cpus: str = field(default="0", metadata={"help": "CPUs the server runs on"})
    client_cpus: str = field(
        default="1",
        metadata={
            "help": "CPUs both clients run on (apart from the server's: a client "
            "that competes with the server for cores slows the server it measures)"
        },
    )
    threads: int = field(default=1, metadata={"help": "compute threads of the server"})
    port: int = field(default=8200, metadata={"help": "the server's port"})
    out: str = field(default="bench/results/aiperf", metadata={"help": "output directory"})


_SNAPSHOT = "0" * 40


def hf_cache_for(model_dir: Path, cache: Path) -> str:
    """Lay the model's tokenizer out as an HF hub cache entry; returns the repo id to pass as --tokenizer."""
    repo = f"local/{model_dir.name}"
    entry = cache / "hub" / f"models--{repo.replace('/', '--')}"
    snap = entry / "snapshots" / _SNAPSHOT
    snap.mkdir(parents=True, exist_ok=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, snap / name)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(_SNAPSHOT)
    return repo


def workload(n: int, interval_ms: float, input_len: int, output_len: int) -> list[TraceRequest]:
    return [TraceRequest(i * interval_ms, input_len, output_len) for i in range(n)]


def aiperf_metrics(artifacts: Path) -> dict[str, float]:
    found = sorted(artifacts.rglob("profile_export_aiperf.json"))
    if not found:
        raise FileNotFoundError(f"no profile_export_aiperf.json under {artifacts}")
    data = json.loads(found[-1].read_text())
    records = data.get("records", data)

    def pick(tag: str, stat: str) -> float:
        entry = records[tag] if isinstance(records, dict) else next(r for r in records if r.get("tag") == tag)
        return float(entry[stat])

    return {
        "ttft_mean_ms": pick("time_to_first_token", "avg"),
        "ttft_p50_ms": pick("time_to_first_token", "p50"),
        # AIPerf's ITL is per request (latency - TTFT) / (output tokens - 1): our TPOT's definition
        "tpot_mean_ms": pick("inter_token_latency", "avg"),
        "chunk_gap_mean_ms": pick("inter_chunk_latency", "avg"),
        "output_tok_s": pick("output_token_throughput", "avg"),
        "requests": pick("request_count", "avg"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.aiperf_check", description=__doc__.splitlines()[0])
    add_options(p, AiperfCheckOptions)
    add_options(p, EngineConfig, only=("model",))
    args = p.parse_args(argv)

    from disagg.model_store import default_model_dir

    model = Path(args.model or default_model_dir())
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    trace = workload(args.requests, args.interval_ms, args.input_tokens, args.output_tokens)
    trace_file = out / "trace.jsonl"
    loaders.write_jsonl(trace, trace_file)
    system = System(
        "disagg-agg",
        [
            "python",
            "-m",
            "disagg.cli",
            "serve",
            "--model",
            str(model),
            "--prefill",
            "0",
            "--decode",
            "1",
            "--threads",
            str(args.threads),
            "--port",
            str(args.port),
            "--cpu-tier-mb",
            "0",
        ],
        {},
        args.port,
    )
    system.command[0] = str(REPO / ".venv" / "bin" / "python")
    proc = start(system, args.cpus, out)
    try:
        wait_ready(system, proc, 600)
        # the trace's own lengths (AIPerf does not scale them): one hash_id = 512 tokens, outputs x1
        scale = TraceScale(block_tokens=512, output_scale=1.0)
        cfg = ReplayConfig(url=system.url, model=model.name, scale=scale, progress=False)
        client_cpus = {int(c) for c in args.client_cpus.split(",")}
        os.sched_setaffinity(0, client_cpus)
        ours = asyncio.run(replay(trace, cfg)).metrics(SLO(10_000, 1_000))
        tokenizer = hf_cache_for(model, out / "hf")
        env = {**os.environ, "HF_HOME": str(out / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        artifacts = out / "aiperf"
        shutil.rmtree(artifacts, ignore_errors=True)
        cmd = [
            "taskset",
            "-c",
            args.client_cpus,
            args.aiperf,
            "profile",
            "--model",
            model.name,
            "--tokenizer",
            tokenizer,
            "--url",
            system.url,
            "--endpoint-type",
            "completions",
            "--streaming",
            "--input-file",
            str(trace_file),
            "--custom-dataset-type",
            "mooncake_trace",
            "--fixed-schedule",
            "--extra-inputs",
            "ignore_eos:true",
            "--use-server-token-count",
            "--output-artifact-dir",
            str(artifacts),
            "--ui-type",
            "none",
            "--random-seed",
            "0",
        ]
        t0 = time.monotonic()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        (out / "aiperf.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            raise RuntimeError(f"aiperf failed ({run.returncode}); see {out / 'aiperf.log'}")
        theirs = aiperf_metrics(artifacts)
        print(f"aiperf ran {time.monotonic() - t0:.0f} s")
    finally:
        stop(proc)
    mine = {
        "ttft_mean_ms": ours["mean_ttft_ms"],
        "ttft_p50_ms": ours["median_ttft_ms"],
        "tpot_mean_ms": ours["mean_tpot_ms"],
        "chunk_gap_mean_ms": ours["mean_itl_ms"],
        "output_tok_s": ours["output_throughput"],
        "requests": ours["completed"],
    }
    rows = {
        k: {"disagg_harness": mine[k], "aiperf": theirs[k], "ratio": mine[k] / theirs[k] if theirs[k] else None}
        for k in mine
    }
    result = {
        "workload": {
            "requests": args.requests,
            "interval_ms": args.interval_ms,
            "input_tokens": args.input_tokens,
            "output_tokens": args.output_tokens,
        },
        "server_cpus": args.cpus,
        "client_cpus": args.client_cpus,
        "command": " ".join(cmd),
        "rows": rows,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
