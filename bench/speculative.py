"""Speculative decoding (prompt lookup) against plain decoding, in one process: a code-editing workload with real
repetition and plain chat.

Code editing: "apply this small change to this file and output the whole file" over real source files (this
repository's own, the first `--file-chars` characters of each), the change a rename of one identifier.  Chat:
the engine benchmark's questions.  Two engines on the same model (`--speculative none` and `ngram`) run the same
prompts (greedy, EOS ignored) at each N, interleaved repeat by repeat.

    .venv/bin/python -m bench.speculative --concurrency 1 8 --max-tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import REPO, emit, print_table
from bench.dynamo_router import cpu_model
from bench.engine_throughput import make_prompts, run_engine, spread, verdict
from bench.quantization import LlamaCppBaseline
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.quant import gguf_file
from disagg.engine.spec import Speculator, spec_config
from disagg.engine.spec_budget import DecodeStepTimes
from disagg.engine.tokenizer import Tokenizer
from disagg.options import add_options

SOURCES = [
    "disagg/utils.py",
    "disagg/engine/sampler.py",
    "disagg/engine/kv_cache.py",
    "disagg/engine/sequence.py",
    "disagg/workload/metrics.py",
    "disagg/engine/faults.py",
    "disagg/engine/tokenizer.py",
    "disagg/engine/block_pool.py",
]


@dataclass
class SpecBenchOptions:
    concurrency: list[int] = field(
        default_factory=lambda: [1, 8], metadata={"nargs": "+", "help": "requests in flight, one run each"}
    )
    max_tokens: int = field(default=128, metadata={"help": "output tokens per request"})
    repeats: int = field(default=3, metadata={"help": "interleaved runs of each mode per concurrency"})
    threads: int = field(default=2, metadata={"help": "torch intra-op threads"})
    file_chars: int = field(default=1500, metadata={"help": "characters of each source file in a prompt"})
    quantization: str = field(default="none", metadata={"help": "weights of both engines (none | int8 | q4)"})
    quant_activations: str = field(
        default="float32", metadata={"help": "what quantized weights multiply (float32 | int16 | int8)"}
    )
    workloads: list[str] = field(
        default_factory=lambda: ["code-edit", "chat"], metadata={"nargs": "+", "help": "code-edit and/or chat"}
    )
    unbudgeted: bool = field(
        default=False,
        metadata={"help": "a third engine that verifies every proposal (the budget's step times held flat)"},
    )
    llamacpp_python: str = field(
        default="",
        metadata={"help": "python of a venv with llama-cpp-python: llama.cpp, plain and prompt lookup, at N=1"},
    )
    out: str = field(default="bench/results/speculative.json", metadata={"help": "JSON file the results go to"})


def code_edit_prompts(tokenizer: Tokenizer, n: int, chars: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        text = (REPO / SOURCES[i % len(SOURCES)]).read_text()[:chars]
        names = re.findall(r"def (\w+)\(", text) or re.findall(r"(\w+) = ", text)
        old = names[0] if names else "self"
        ask = f"Rename `{old}` to `{old}_v2` in this file. Reply with the whole updated file only.\n\n{text}"
        prompts.append(tokenizer.encode_chat([{"role": "user", "content": ask}]))
    return prompts


def _unbudgeted(config: EngineConfig) -> Speculator:
    """A speculator whose budget sees rows as free: every proposal is verified (what the budget is measured
    against)."""
    speculator = Speculator(spec_config(config))
    flat = DecodeStepTimes(alpha=0.0)
    flat.add(1, 1.0)
    flat.add(2, 1.0)
    speculator.times = flat
    return speculator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, EngineConfig, only=("model",))
    add_options(parser, SpecBenchOptions)
    args = parser.parse_args(argv)
    if unknown := set(args.workloads) - {"code-edit", "chat"}:
        parser.error(f"--workloads: unknown {sorted(unknown)} (code-edit, chat)")
    engines = {
        mode: LLMEngine(
            EngineConfig(
                model=args.model,
                speculative=mode.removesuffix("-all"),
                quantization=args.quantization,
                quant_activations=args.quant_activations,
                max_num_seqs=max(args.concurrency),
                num_threads=args.threads,
                kv_cache_memory_mb=512,
            )
        )
        for mode in ("none", "ngram", *(("ngram-all",) if args.unbudgeted else ()))
    }
    if args.unbudgeted:
        engines["ngram-all"].speculator = _unbudgeted(engines["ngram-all"].config)
    plain, spec = engines["none"], engines["ngram"]
    assert plain.tokenizer is not None and spec.speculator is not None
    workloads = {
        "code-edit": {n: code_edit_prompts(plain.tokenizer, n, args.file_chars) for n in args.concurrency},
        "chat": {n: make_prompts(plain, n) for n in args.concurrency},
    }
    workloads = {name: by_n for name, by_n in workloads.items() if name in args.workloads}
    for engine in engines.values():
        run_engine(engine, make_prompts(engine, 2), 4)  # warm-up
    peers: dict[str, LlamaCppBaseline] = {}
    if args.llamacpp_python and 1 in args.concurrency:
        gguf = gguf_file(Path(plain.config.model))
        if gguf is None:
            raise SystemExit(f"{plain.config.model} has no GGUF file for llama.cpp")
        for name, lookup in (("llama.cpp", False), ("llama.cpp+lookup", True)):
            peers[name] = LlamaCppBaseline(args.llamacpp_python, gguf, args.max_tokens, args.threads, lookup)
    runs: dict[tuple[str, int, str], list[dict]] = {}
    accepted: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for workload, by_n in workloads.items():
            for n, prompts in by_n.items():
                for name, peer in peers.items() if n == 1 else ():
                    runs.setdefault((workload, n, name), []).append(peer.run(prompts))
                for mode, engine in engines.items():
                    before = (spec.speculator.stats.proposed_tokens, spec.speculator.stats.accepted_tokens)
                    runs.setdefault((workload, n, mode), []).append(run_engine(engine, prompts, args.max_tokens))
                    if mode == "ngram":
                        proposed = spec.speculator.stats.proposed_tokens - before[0]
                        got = spec.speculator.stats.accepted_tokens - before[1]
                        accepted.setdefault((workload, n), []).append(got / proposed if proposed else 0.0)
    for peer in peers.values():
        peer.close()
    rows = []
    for workload, by_n in workloads.items():
        for n in by_n:
            base = [r["output_tok_s"] for r in runs[(workload, n, "none")]]
            ours = spread([r["output_tok_s"] for r in runs[(workload, n, "ngram")]])
            rows.append(
                {
                    "workload": workload,
                    "concurrency": n,
                    "plain_tok_s": statistics.median(base),
                    "plain_min": min(base),
                    "plain_max": max(base),
                    "spec_tok_s": ours["median"],
                    "spec_min": ours["min"],
                    "spec_max": ours["max"],
                    "speedup": ours["median"] / statistics.median(base),
                    "verdict": verdict(ours["runs"], base),
                    "acceptance": statistics.median(accepted[(workload, n)]),
                    "same_tokens": all(
                        a["token_ids"] == b["token_ids"]
                        for a, b in zip(runs[(workload, n, "none")], runs[(workload, n, "ngram")])
                    ),
                }
            )
            if args.unbudgeted:
                every = [r["output_tok_s"] for r in runs[(workload, n, "ngram-all")]]
                rows[-1]["unbudgeted_tok_s"] = statistics.median(every)
                rows[-1]["unbudgeted_speedup"] = statistics.median(every) / statistics.median(base)
                rows[-1]["budget_vs_unbudgeted"] = ours["median"] / statistics.median(every)
                rows[-1]["verdict_vs_unbudgeted"] = verdict(ours["runs"], every)
            for name in peers if n == 1 else ():
                theirs = [r["output_tok_s"] for r in runs[(workload, n, name)]]
                rows[-1][f"{name}_tok_s"] = statistics.median(theirs)
                rows[-1][f"spec_vs_{name}"] = ours["median"] / statistics.median(theirs)
                rows[-1][f"verdict_vs_{name}"] = verdict(ours["runs"], theirs)
    print_table(rows, f"speculative decoding (n-gram) vs plain, {cpu_model()}, {args.threads} threads")
    emit(
        {
            "benchmark": "speculative",
            "cpu": cpu_model(),
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "quantization": args.quantization,
            "quant_activations": args.quant_activations,
            "rows": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
