"""Quantized weights against float32 in one process: decode throughput at N concurrent requests and quality under
teacher forcing.

Every mode (`--modes none int8 q4`) is a separate engine on the same model, run on the same chat prompts with the
same output length (greedy, ignore EOS), interleaved repeat by repeat so machine noise hits all alike.  Quality is
measured on a fixed text (`tests/data/eval_text.txt`): every position's next-token logits of each mode against
float32's on the *same* token sequence (free-running text diverges after the first differing token and says
little), as top-1 agreement and perplexity.

    .venv/bin/python -m bench.quantization --concurrency 1 8 32 --max-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import BaselineProcess, emit, print_table
from bench.dynamo_router import cpu_model
from bench.engine_throughput import make_prompts, read_bandwidth_gbs, run_engine, spread, verdict
from disagg.config import EngineConfig
from disagg.engine.attention import AttentionMetadata, compact_tables
from disagg.engine.engine import LLMEngine
from disagg.engine.quant import QuantConfig, gguf_file
from disagg.engine.runner import ModelRunner, load_model
from disagg.options import add_options

LLAMA = "llama.cpp"
# quality is measured in steps of this many tokens: as decode steps run (the block kernels, the native step)
QUALITY_CHUNK = QuantConfig().direct_rows
EVAL_TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "eval_text.txt"


@dataclass
class QuantBenchOptions:
    modes: list[str] = field(
        default_factory=lambda: ["none", "int8", "q4"],
        metadata={
            "nargs": "+",
            "help": "modes to compare, QUANT[/a8|/a16[-rows]][+ngram][:KV]: a quantization, /a8 or /a16 for "
            "--quant-activations int8 or int16 (-rows: int16 over the row layout, --no-quant-repack), "
            "+ngram for speculative decoding, :KV for a --kv-dtype (none:int8 = float32 weights, int8 KV cache)",
        },
    )
    concurrency: list[int] = field(
        default_factory=lambda: [1, 8, 32], metadata={"nargs": "+", "help": "requests in flight, one run each"}
    )
    max_tokens: int = field(default=64, metadata={"help": "output tokens per request"})
    repeats: int = field(default=3, metadata={"help": "interleaved runs of each mode per concurrency"})
    threads: int = field(default=2, metadata={"help": "torch intra-op threads"})
    kv_cache_mb: int = field(default=256, metadata={"help": "KV cache of each engine, MiB"})
    llamacpp_python: str = field(
        default="", metadata={"help": "python of a venv with llama-cpp-python: adds llama.cpp on the GGUF at N=1"}
    )
    out: str = field(default="bench/results/quantization.json", metadata={"help": "JSON file the results go to"})


class LlamaCppBaseline(BaselineProcess):
    """bench/llamacpp_baseline.py on a GGUF file (`lookup`: with llama.cpp's own prompt-lookup decoding)."""

    def __init__(self, python: str, gguf: Path, max_tokens: int, threads: int, lookup: bool = False) -> None:
        args = [str(gguf), str(max_tokens), str(threads)] + (["lookup"] if lookup else [])
        super().__init__("LLAMACPP", [python, "-m", "bench.llamacpp_baseline", *args])


@torch.inference_mode()
def teacher_forced_logits(runner: ModelRunner, tokens: list[int], chunk: int = 0) -> torch.Tensor:
    """Next-token logits [len(tokens), vocab] at every position of one sequence, on blocks 0..n of the runner's
    own KV cache (use a runner no engine owns: its blocks are overwritten): in one prefill, or (`chunk` > 0) in
    steps of `chunk` tokens, which run as decode steps do (the native step of a quantized model)."""
    bs = runner.block_size
    n = len(tokens)
    blocks = list(range(-(-n // bs)))
    if len(blocks) > runner.num_blocks:
        raise ValueError(f"{n} tokens need {len(blocks)} KV blocks; the runner has {runner.num_blocks}")
    logits = []
    for start in range(0, n, chunk or n):
        end = min(n, start + (chunk or n))
        used = blocks[: -(-end // bs)]
        gather_ids, compact = compact_tables([used], torch.device("cpu"))
        meta = AttentionMetadata(
            slot_mapping=torch.arange(start, end, dtype=torch.int64),
            block_tables=torch.tensor([used], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            query_start_loc=torch.tensor([0, end - start], dtype=torch.int32),
            seq_lens_list=[end],
            query_start_list=[0, end - start],
            max_query_len=end - start,
            block_size=bs,
            gather_ids=gather_ids,
            compact_tables=compact,
        )
        ids, pos = torch.tensor(tokens[start:end], dtype=torch.int64), torch.arange(start, end, dtype=torch.int64)
        logits.append(runner.model.compute_logits(runner.hidden_states(ids, pos, meta, [])))
    return torch.cat(logits)


def perplexity(logits: torch.Tensor, tokens: list[int]) -> float:
    """exp(mean negative log-likelihood of each next token)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    target = torch.tensor(tokens[1:])
    return math.exp(-logp.gather(1, target[:, None]).mean().item())


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Share of positions whose top-1 token equals the reference's."""
    return (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()


@dataclass(frozen=True)
class Mode:
    """One engine of the comparison: QUANT[/a8|/a16[-rows]][+SPEC][:KV] (`/a8`: --quant-activations int8, `/a16`
    int16, `-rows`: --no-quant-repack)."""

    quantization: str
    activations: str
    speculative: str
    kv_dtype: str
    repack: bool = True

    @property
    def weights(self) -> str:
        """The mode less its speculation: what the logits depend on."""
        suffix = {"int8": "/a8", "int16": "/a16"}.get(self.activations, "") + ("" if self.repack else "-rows")
        return f"{self.quantization}{suffix}:{self.kv_dtype}"

    def config(self, **kwargs) -> EngineConfig:
        return EngineConfig(
            quantization=self.quantization,
            quant_activations=self.activations,
            speculative=self.speculative,
            kv_dtype=self.kv_dtype,
            quant_repack=self.repack,
            **kwargs,
        )


def parse_mode(mode: str) -> Mode:
    head, _, kv = mode.partition(":")
    weights, _, spec = head.partition("+")
    quant, _, act = weights.partition("/")
    act, _, layout = act.partition("-")
    activations = {"": "float32", "a8": "int8", "a16": "int16"}
    if act not in activations or layout not in ("", "rows"):
        raise ValueError(f"mode {mode!r}: the activation suffixes are /a8, /a16 and /a16-rows")
    return Mode(quant, activations[act], spec or "none", kv or "auto", repack=layout != "rows")


def quality(model: str, modes: list[str], kv_cache_mb: int) -> list[dict]:
    rows: list[dict] = []
    reference = None
    # speculation does not change the logits: one row per (weights, KV format), float32's first
    pairs = dict.fromkeys(m.weights for m in map(parse_mode, modes) if m.weights != "none:auto")
    for mode in ["none:auto", *pairs]:
        runner, tokenizer = load_model(parse_mode(mode).config(model=model, kv_cache_memory_mb=kv_cache_mb))
        assert tokenizer is not None
        tokens = tokenizer.encode(EVAL_TEXT.read_text())
        logits = teacher_forced_logits(runner, tokens, QUALITY_CHUNK)
        reference = logits if reference is None else reference
        rows.append(
            {
                "mode": mode,
                "tokens": len(tokens),
                "top1_agreement": agreement(reference, logits),
                "perplexity": perplexity(logits, tokens),
                "max_abs_logit_diff": (logits - reference).abs().max().item(),
            }
        )
    base = float(rows[0]["perplexity"])
    for row in rows:
        row["ppl_vs_fp32"] = float(row["perplexity"]) / base
    return rows


def throughput_rows(
    args: argparse.Namespace, runs: dict[str, dict[int, list[dict]]], runners: dict[str, ModelRunner]
) -> list[dict]:
    """One row per (N, mode), with each mode's ratio to the first mode and (N = 1) to llama.cpp."""
    base = args.modes[0]
    rows = []
    for n in args.concurrency:
        for mode in [m for m in runs if n in runs[m]]:
            tok_s = spread([r["output_tok_s"] for r in runs[mode][n]])
            weights = runners[mode].model.weight_bytes_per_token() if mode in runners else 0
            row = {
                "concurrency": n,
                "mode": mode,
                "kernel": runners[mode].kernel_path if mode in runners else "llama.cpp",
                "tok_s": tok_s["median"],
                "min": tok_s["min"],
                "max": tok_s["max"],
                "weight_mb_per_step": weights / 1e6,
                "weight_gbs": weights * tok_s["median"] / n / 1e9,
                "same_tokens_as_" + base: runs[mode][n][0]["token_ids"] == runs[base][n][0]["token_ids"],
            }
            for other in [o for o in (base, LLAMA) if o != mode]:
                if n in runs.get(other, {}):
                    ref = [r["output_tok_s"] for r in runs[other][n]]
                    row["vs_" + other] = tok_s["median"] / statistics.median(ref)
                    row["verdict_vs_" + other] = verdict(tok_s["runs"], ref)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, EngineConfig, only=("model",))
    add_options(parser, QuantBenchOptions)
    args = parser.parse_args(argv)
    engines: dict[str, LLMEngine] = {}
    runners: dict[str, ModelRunner] = {}
    for mode in args.modes:
        config = parse_mode(mode).config(
            model=args.model,
            max_num_seqs=max(args.concurrency),
            num_threads=args.threads,
            kv_cache_memory_mb=args.kv_cache_mb,
        )
        runner, tokenizer = load_model(config)
        runners[mode] = runner
        engines[mode] = LLMEngine(config, runner, tokenizer)
    first = next(iter(engines.values()))
    for engine in engines.values():
        run_engine(engine, make_prompts(engine, 2), 4)  # warm-up
    prompts = {n: make_prompts(first, n) for n in args.concurrency}
    runs: dict[str, dict[int, list[dict]]] = {m: {n: [] for n in args.concurrency} for m in engines}
    llama = None
    if args.llamacpp_python:
        gguf = gguf_file(Path(first.config.model))
        if gguf is None:
            raise SystemExit(f"{first.config.model} has no GGUF file for llama.cpp")
        llama = LlamaCppBaseline(args.llamacpp_python, gguf, args.max_tokens, args.threads)
        runs[LLAMA] = {1: []}
    try:
        for _ in range(args.repeats):
            for n in args.concurrency:
                for mode, engine in engines.items():
                    runs[mode][n].append(run_engine(engine, prompts[n], args.max_tokens))
                if llama is not None and n == 1:
                    runs[LLAMA][1].append(llama.run(prompts[1]))
    finally:
        if llama is not None:
            llama.close()
    bandwidth = read_bandwidth_gbs(args.threads)
    rows = throughput_rows(args, runs, runners)
    print_table(rows, f"decode throughput by quantization, {cpu_model()}, {args.threads} threads")
    quality_rows = quality(first.config.model, args.modes, args.kv_cache_mb)
    print_table(quality_rows, f"teacher-forced quality on {EVAL_TEXT.name}")
    emit(
        {
            "benchmark": "quantization",
            "cpu": cpu_model(),
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "read_bandwidth_gbs": bandwidth,
            "rows": rows,
            "quality": quality_rows,
            "runs": {m: {n: [r["output_tok_s"] for r in v] for n, v in by_n.items()} for m, by_n in runs.items()},
        },
        args.out,
    )


if __name__ == "__main__":
    main()
