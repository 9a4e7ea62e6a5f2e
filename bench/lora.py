"""Engine throughput with LoRA adapters: N requests in flight spread over K adapters (one batch holds them all)
against the same N requests on the base model, in one process, interleaved repeats.  Two mixes: an even one
(round robin: every adapter has as many requests) and an uneven one (a few adapters take most requests).

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


def uneven(n: int, k: int) -> list[int]:
    """n requests over k adapters, adapter i taking about twice the share of adapter i + 2 (every adapter at least
    once), interleaved: the groups of a step differ in size, as in real traffic."""
    weights = [2 ** (-i / 2) for i in range(k)]
    counts = [1 + int((n - k) * w / sum(weights)) for w in weights]
    counts[0] += n - sum(counts)
    order = sorted(range(n), key=lambda j: (j * 7919) % n)  # a fixed shuffle: the groups are not in a row
    flat = [i for i, c in enumerate(counts) for _ in range(c)]
    return [flat[order[j]] for j in range(n)]


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
    refs = [LoRARef(f"a{i}", str(path)) for i, path in enumerate(paths)]
    mixes: dict[str, list[LoRARef | None]] = {
        "base": [None] * opts.concurrency,
        "adapters": [refs[i % opts.adapters] for i in range(opts.concurrency)],  # an even mix
        "adapters, uneven": [refs[i] for i in uneven(opts.concurrency, opts.adapters)],
    }
    run(plain, prompts[:4], mixes["base"][:4], 4)  # warm-up
    run(served, prompts[: opts.adapters], refs, 4)  # warm-up: loads the adapters, wraps layers
    rates: dict[str, list[float]] = {k: [] for k in mixes}
    for _ in range(opts.repeats):  # each repeat runs every arm back to back
        for arm, mix in mixes.items():
            rates[arm].append(run(plain if arm == "base" else served, prompts, mix, opts.max_tokens))
    median = {k: statistics.median(v) for k, v in rates.items()}
    vs_base = {}
    for arm in rates:
        pairs = [a / b for a, b in zip(rates[arm], rates["base"])]  # each repeat's runs, back to back
        vs_base[arm] = f"{statistics.median(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f})"
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
