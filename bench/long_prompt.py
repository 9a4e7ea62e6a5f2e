"""A long prompt's time to first token and whole request, engine against engine, in one process.

One request at a time: a prompt of `--prompt-tokens` tokens (the engine benchmark's chat prompts, repeated) and
`--max-tokens` greedy tokens, cold (the prefix cache reset before each run).  Each mode (bench.quantization's
names: QUANT[/a8|/a16][:KV]) is loaded once; runs are interleaved mode by mode, `--repeats` times.  The first mode
is the baseline every ratio is taken against.

    .venv/bin/python -m bench.long_prompt --modes q4/a16 q4/a16:int8 --prompt-tokens 1500 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

from bench.common import emit, print_table
from bench.dynamo_router import cpu_model
from bench.engine_throughput import make_prompts, spread, verdict
from bench.quantization import parse_mode
from disagg.engine.engine import LLMEngine
from disagg.engine.runner import load_model
from disagg.options import add_options
from disagg.protocol import SamplingParams


@dataclass
class LongPromptOptions:
    modes: list[str] = field(
        default_factory=lambda: ["q4/a16", "q4/a16:int8"],
        metadata={"nargs": "+", "help": "engines to compare (bench.quantization's mode names; the first: baseline)"},
    )
    prompt_tokens: int = field(default=1500, metadata={"help": "tokens of the prompt"})
    max_tokens: int = field(default=64, metadata={"help": "output tokens of the whole-request run"})
    repeats: int = field(default=5, metadata={"help": "interleaved runs of each mode"})
    threads: int = field(default=2, metadata={"help": "torch intra-op threads"})
    kv_cache_mb: int = field(default=256, metadata={"help": "KV cache of each engine, MiB"})
    model: str = field(default="", metadata={"help": "model directory (empty: the default model)"})
    out: str = field(default="bench/results/long_prompt.json", metadata={"help": "JSON file the results go to"})


def timed(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(time to first token, whole request) in seconds, from a cold prefix cache."""
    engine.pool.reset_prefix_cache()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    result = engine.generate([prompt], params)[0]
    return result.ttft_s, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, LongPromptOptions)
    args = parser.parse_args(argv)
    engines: dict[str, LLMEngine] = {}
    kernels: dict[str, str] = {}
    for mode in args.modes:
        extra = {"model": args.model} if args.model else {}
        config = parse_mode(mode).config(num_threads=args.threads, kv_cache_memory_mb=args.kv_cache_mb, **extra)
        runner, tokenizer = load_model(config)
        kernels[mode] = runner.kernel_path
        engines[mode] = LLMEngine(config, runner, tokenizer)
    first = next(iter(engines.values()))
    prompt = [t for p in make_prompts(first, 8) for t in p]
    prompt = (prompt * (args.prompt_tokens // len(prompt) + 1))[: args.prompt_tokens]
    for engine in engines.values():
        timed(engine, prompt[:256], 2)  # warm-up
    runs: dict[str, dict[str, list[float]]] = {m: {"ttft_s": [], "request_s": []} for m in engines}
    for _ in range(args.repeats):
        for mode, engine in engines.items():
            ttft, whole = timed(engine, prompt, args.max_tokens)
            runs[mode]["ttft_s"].append(ttft)
            runs[mode]["request_s"].append(whole)
    base = args.modes[0]
    rows = []
    for mode, r in runs.items():
        row = {"mode": mode, "kernel": kernels[mode]}
        for key in ("ttft_s", "request_s"):
            s = spread(r[key])
            row[key], row[key + "_min"], row[key + "_max"] = s["median"], s["min"], s["max"]
            # faster is better: the baseline's times over ours, and "met" when every run of ours is shorter
            row[key + "_speedup_vs_" + base] = statistics.median(runs[base][key]) / s["median"]
            row[key + "_verdict"] = verdict([1 / x for x in r[key]], [1 / x for x in runs[base][key]])
        rows.append(row)
    print_table(rows, f"{args.prompt_tokens}-token prompt, {args.max_tokens} tokens, {cpu_model()}")
    emit({"cpu": cpu_model(), "options": vars(args), "rows": rows, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
