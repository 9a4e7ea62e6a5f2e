"""Engine throughput with LoRA adapters: N requests in flight spread over K adapters (one batch holds them all)
against the same N requests on the base model, in one process, interleaved repeats.

Adapters are trained here on the default model with PEFT (fixed seeds, a few steps: bench/loras.py), rank 8 on
all seven projections, and kept under --adapters-dir between runs.

    .venv/bin/python -m bench.lora --adapters 8 --concurrency 32 --max-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import emit, print_table
from bench.dynamo_router import cpu_model
from bench.engine_throughput import make_prompts
from bench.loras import make_lora
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.model_store import default_model_dir
from disagg.options import add_options, from_options
from disagg.protocol import LoRARef, SamplingParams


@dataclass
class LoRABenchOptions:
    adapters: int = field(default=8, metadata={"help": "adapters the requests are spread over (round robin)"})
    concurrency: int = field(default=32, metadata={"help": "requests in flight"})
    max_tokens: int = field(default=64, metadata={"help": "output tokens per request"})
    repeats: int = field(default=3, metadata={"help": "interleaved runs of each side"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    rank: int = field(default=8, metadata={"help": "LoRA rank of every adapter"})
    adapters_dir: str = field(default="bench/results/loras", metadata={"help": "where the trained adapters are kept"})
    out: str = field(default="bench/results/lora.json", metadata={"help": "JSON file the results go to"})


def run(engine: LLMEngine, prompts: list[list[int]], refs: Sequence[LoRARef | None], max_tokens: int) -> float:
    """Output tokens per second of the prompts run to completion together, each with its adapter."""
    engine.pool.reset_prefix_cache()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, (prompt, ref) in enumerate(zip(prompts, refs)):
        engine.add_request(f"b{t0}-{i}", prompt, params, lora=ref)
    tokens = 0
    while engine.has_unfinished():
        tokens += sum(len(d.token_ids) for d in engine.step())
    return tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.lora", description=__doc__.splitlines()[0])
    add_options(p, LoRABenchOptions)
    opts = from_options(LoRABenchOptions, p.parse_args(argv))
    torch.set_num_threads(opts.threads)
    model_dir = default_model_dir()
    root = Path(opts.adapters_dir)
    paths = [
        make_lora(model_dir, root / f"r{opts.rank}-{i}", seed=i, rank=opts.rank, alpha=2 * opts.rank, steps=2)
        for i in range(opts.adapters)
    ]
    # two engines of the same model: one never sees an adapter (the base as it is served without LoRA)
    config = EngineConfig(kv_cache_memory_mb=512, num_threads=opts.threads, max_loras=opts.adapters)
    plain, served = LLMEngine(config), LLMEngine(config)
    prompts = make_prompts(plain, opts.concurrency)
    adapted = [LoRARef(f"a{i % opts.adapters}", str(paths[i % opts.adapters])) for i in range(opts.concurrency)]
    base: list[LoRARef | None] = [None] * opts.concurrency
    run(plain, prompts[:4], base[:4], 4)  # warm-up
    run(served, prompts[: opts.adapters], adapted[: opts.adapters], 4)  # warm-up: loads the adapters, wraps layers
    rates: dict[str, list[float]] = {"base": [], "adapters": []}
    for _ in range(opts.repeats):
        rates["base"].append(run(plain, prompts, base, opts.max_tokens))
        rates["adapters"].append(run(served, prompts, adapted, opts.max_tokens))
    median = {k: statistics.median(v) for k, v in rates.items()}
    pairs = [a / b for a, b in zip(rates["adapters"], rates["base"])]  # each repeat's two runs, back to back
    vs_base = {"base": "1.00x", "adapters": f"{statistics.median(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f})"}
    rows = [
        {
            "side": k,
            "output tok/s median": f"{median[k]:.1f}",
            "range": f"{min(v):.1f}-{max(v):.1f}",
            "vs base, per repeat (median, range)": vs_base[k],
        }
        for k, v in rates.items()
    ]
    print_table(rows, f"{opts.adapters} adapters, N={opts.concurrency}, {opts.max_tokens} tokens")
    emit({"options": vars(opts), "cpu": cpu_model(), "rates": rates, "rows": rows}, opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
