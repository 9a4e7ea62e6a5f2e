"""Speculative decoding (prompt lookup) against plain decoding, in one process: a code-editing workload with real
repetition and plain chat.

Code editing: "apply this small change to this file and output the whole file" over real source files (this
repository's own, the first `--file-chars` characters of each), the change a rename of one identifier.  Chat:
the engine benchmark's questions.  Engines on the same model - `--speculative none`, `ngram` (its budget deciding
how many proposed tokens a step verifies) and with `--unbudgeted` an `ngram` engine verifying every proposal -
run the same prompts (greedy, EOS ignored) at each N, interleaved repeat by repeat.

    .venv/bin/python -m bench.speculative --concurrency 1 8 --max-tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import re
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.common import REPO, emit, print_table
from bench.dynamo_router import cpu_model
from bench.engine_throughput import make_prompts, run_engine, spread, verdict
from bench.quantization import LlamaCppBaseline
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.quant import gguf_file
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
    quant_repack: bool = field(
        default=True, metadata={"help": "int16: weights packed into panels at load (--no-quant-repack: row layout)"}
    )
    workloads: list[str] = field(
        default_factory=lambda: ["code-edit", "chat"], metadata={"nargs": "+", "help": "code-edit and/or chat"}
    )
    unbudgeted: bool = field(
        default=False,
        metadata={"help": "a third engine that verifies every proposal (every plan explores: nothing is cut)"},
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


def _engines(args: argparse.Namespace) -> dict[str, LLMEngine]:
    """Plain, n-gram with the budget, and (--unbudgeted) n-gram verifying every proposal."""
    engines = {
        mode: LLMEngine(
            EngineConfig(
                model=args.model,
                speculative=mode.removesuffix("-all"),
                quantization=args.quantization,
                quant_activations=args.quant_activations,
                quant_repack=args.quant_repack,
                max_num_seqs=max(args.concurrency),
                num_threads=args.threads,
                kv_cache_memory_mb=512,
            )
        )
        for mode in ("none", "ngram", *(("ngram-all",) if args.unbudgeted else ()))
    }
    if args.unbudgeted:
        every = engines["ngram-all"].speculator
        assert every is not None
        every.config = replace(every.config, explore_every=1)  # every plan explores: no proposal is cut
    for engine in engines.values():
        run_engine(engine, make_prompts(engine, 2), 4)  # warm-up
    return engines


def _peers(args: argparse.Namespace, model: str) -> dict[str, LlamaCppBaseline]:
    peers: dict[str, LlamaCppBaseline] = {}
    if args.llamacpp_python and 1 in args.concurrency:
        gguf = gguf_file(Path(model))
        if gguf is None:
            raise SystemExit(f"{model} has no GGUF file for llama.cpp")
        for name, lookup in (("llama.cpp", False), ("llama.cpp+lookup", True)):
            peers[name] = LlamaCppBaseline(args.llamacpp_python, gguf, args.max_tokens, args.threads, lookup)
    return peers


Runs = dict[tuple[str, int, str], list[dict]]


def _run(
    args: argparse.Namespace, engines: dict[str, LLMEngine], workloads: dict, peers: dict[str, LlamaCppBaseline]
) -> Runs:
    """Every system on every cell, interleaved repeat by repeat; each n-gram run records its proposed and
    accepted tokens."""
    runs: Runs = {}
    for _ in range(args.repeats):
        for workload, by_n in workloads.items():
            for n, prompts in by_n.items():
                for name, peer in peers.items() if n == 1 else ():
                    runs.setdefault((workload, n, name), []).append(peer.run(prompts))
                for mode, engine in engines.items():
                    stats = engine.speculator.stats if engine.speculator else None
                    before = (stats.proposed_tokens, stats.accepted_tokens) if stats else (0, 0)
                    result = run_engine(engine, prompts, args.max_tokens)
                    if stats:
                        result["proposed"] = stats.proposed_tokens - before[0]
                        result["accepted"] = stats.accepted_tokens - before[1]
                    runs.setdefault((workload, n, mode), []).append(result)
    return runs


def free_verification_bound(plain: list[dict], spec: list[dict], n: int) -> float:
    """The speedup speculation would reach if verifying cost nothing: plain decoding's time against its prefill
    (time to first token) plus one plain decode step per token not accepted from a proposal.  Medians over the
    runs; with n > 1 the accepted tokens are spread evenly over the requests (the slowest decides, so the true
    bound is lower).  `spec` should be the arm that verifies every proposal (`--unbudgeted`): free verifying, the
    budget would cut nothing.  What a cheaper verification cannot pass: only more accepted tokens can."""
    wall = statistics.median(r["wall_s"] for r in plain)
    ttft = statistics.median(r["ttft_mean_ms"] for r in plain) / 1e3
    per_request = statistics.median(r["output_tokens"] for r in plain) / n
    step = (wall - ttft) / max(per_request - 1, 1)
    accepted = statistics.median(r["accepted"] for r in spec) / n
    return wall / (ttft + max(per_request - 1 - accepted, 0) * step)


def _row(args: argparse.Namespace, runs: Runs, workload: str, n: int, peers: dict[str, LlamaCppBaseline]) -> dict:
    base = [r["output_tok_s"] for r in runs[(workload, n, "none")]]
    spec = runs[(workload, n, "ngram")]
    ours = spread([r["output_tok_s"] for r in spec])
    row = {
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
        "proposed_per_run": statistics.median(r["proposed"] for r in spec),  # tokens verified as proposals
        "acceptance": statistics.median(r["accepted"] / r["proposed"] if r["proposed"] else 0.0 for r in spec),
        # free verification would cut nothing: the arm that verifies every proposal counts, where it ran
        "free_verification_bound": free_verification_bound(
            runs[(workload, n, "none")], runs.get((workload, n, "ngram-all")) or spec, n
        ),
        "bound_from": "ngram-all" if (workload, n, "ngram-all") in runs else "ngram",
        "same_tokens": all(  # every speculating arm's tokens are plain decoding's
            a["token_ids"] == b["token_ids"]
            for mode in ("ngram", "ngram-all")
            for a, b in zip(runs[(workload, n, "none")], runs.get((workload, n, mode), []))
        ),
    }
    if args.unbudgeted:
        every = [r["output_tok_s"] for r in runs[(workload, n, "ngram-all")]]
        row["unbudgeted_tok_s"] = statistics.median(every)
        row["unbudgeted_min"], row["unbudgeted_max"] = min(every), max(every)
        row["unbudgeted_speedup"] = statistics.median(every) / statistics.median(base)
        row["unbudgeted_proposed_per_run"] = statistics.median(r["proposed"] for r in runs[(workload, n, "ngram-all")])
        row["budget_vs_unbudgeted"] = ours["median"] / statistics.median(every)
        row["verdict_vs_unbudgeted"] = verdict(ours["runs"], every)
    for name in peers if n == 1 else ():
        theirs = [r["output_tok_s"] for r in runs[(workload, n, name)]]
        row[f"{name}_tok_s"] = statistics.median(theirs)
        row[f"spec_vs_{name}"] = ours["median"] / statistics.median(theirs)
        row[f"verdict_vs_{name}"] = verdict(ours["runs"], theirs)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, EngineConfig, only=("model",))
    add_options(parser, SpecBenchOptions)
    args = parser.parse_args(argv)
    if unknown := set(args.workloads) - {"code-edit", "chat"}:
        parser.error(f"--workloads: unknown {sorted(unknown)} (code-edit, chat)")
    engines = _engines(args)
    plain = engines["none"]
    assert plain.tokenizer is not None
    workloads = {
        "code-edit": {n: code_edit_prompts(plain.tokenizer, n, args.file_chars) for n in args.concurrency},
        "chat": {n: make_prompts(plain, n) for n in args.concurrency},
    }
    workloads = {name: by_n for name, by_n in workloads.items() if name in args.workloads}
    peers = _peers(args, plain.config.model)
    runs = _run(args, engines, workloads, peers)
    for peer in peers.values():
        peer.close()
    rows = [_row(args, runs, workload, n, peers) for workload, by_n in workloads.items() for n in by_n]
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
            "quant_repack": args.quant_repack,
            "rows": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
