"""The native step alone: one decode step (the whole stack and the LM head, `StackKernel.forward_logits`) of T
tokens of T sequences, each at position P, on the default model's own engine (its packed weights, its KV cache).

What the engine benchmarks mix together - a step's weights pass, its attention over P cached slots, Python around
it, prefill - this separates: a step at P = 100 is mostly the weights, one at P = 2,000 mostly attention.  The
timed call is `forward_logits` whole, with its few tensor conversions (~1% of a 5 ms step).  Each sequence's blocks
are drawn at random from the cache (seeded), as a pool that has served a while hands them out.  Each
measurement is the median step time of `--iters` steps (the first fifth dropped); (T, P) cells are interleaved
within each repeat, and each figure is the median (min-max) of `--repeats`.  To compare two commits' kernels, run
it alternately with each commit's `kernels/` first on the path (the step's C++ is built from that folder):

    .venv/bin/python -m bench.native_step --tokens 1 8 --positions 100 300 2000 --repeats 5
    PYTHONPATH=/path/to/other/checkout/kernels .venv/bin/python -m bench.native_step ...
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import disagg_kernels
from bench.common import emit, print_table
from bench.dynamo_router import cpu_model
from bench.quantization import parse_mode
from disagg.config import EngineConfig
from disagg.engine.runner import ModelRunner, load_model
from disagg.options import add_options


@dataclass
class NativeStepOptions:
    mode: str = field(default="q4/a16", metadata={"help": "engine mode, as bench.quantization's --modes"})
    tokens: list[int] = field(default_factory=lambda: [1], metadata={"nargs": "+", "help": "tokens per step (T)"})
    positions: list[int] = field(
        default_factory=lambda: [100, 300, 2000], metadata={"nargs": "+", "help": "each token's position (P)"}
    )
    iters: int = field(default=200, metadata={"help": "steps per measurement"})
    repeats: int = field(default=5, metadata={"help": "interleaved repeats"})
    threads: int = field(default=2, metadata={"help": "torch intra-op threads"})
    kv_cache_mb: int = field(default=1024, metadata={"help": "the engine's KV cache, MiB"})
    out: str = field(default="bench/results/native_step.json", metadata={"help": "JSON file the results go to"})


def step_ms(runner: ModelRunner, tokens: int, position: int, iters: int) -> float:
    """Median wall time (ms) of `iters` steps of `tokens` sequences at `position`, the first fifth dropped."""
    step = runner.native_step
    assert step is not None  # check_cells
    blocks = _blocks(runner, position)
    order = torch.randperm(runner.num_blocks, generator=torch.Generator().manual_seed(position))
    tables = order[: tokens * blocks].to(torch.int32).reshape(tokens, blocks)
    positions = torch.full((tokens,), position, dtype=torch.int64)
    rows = torch.arange(tokens, dtype=torch.int64)
    hidden = torch.randn(tokens, step.kernel.shape.hidden, generator=torch.Generator().manual_seed(0))
    pick = list(range(tokens))
    times = []
    for _ in range(iters):
        x = hidden.clone()
        t0 = time.perf_counter()
        step.kernel.forward_logits(x, positions, tables, rows, pick)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[iters // 5 :]) * 1e3


def _blocks(runner: ModelRunner, position: int) -> int:
    return -(-(position + 1) // runner.block_size)


def check_cells(runner: ModelRunner, cells: list[tuple[int, int]]) -> None:
    """Every (tokens, position) cell runnable on this engine, checked before any is timed."""
    if runner.native_step is None or not runner.native_step.holds_head:
        raise SystemExit("this mode has no native step that holds the LM head (a quantized model with panels)")
    for tokens, position in cells:
        need = tokens * _blocks(runner, position)
        if need > runner.num_blocks:
            raise SystemExit(f"{tokens} x {position} slots need {need} KV blocks; raise --kv-cache-mb")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, EngineConfig, only=("model",))
    add_options(parser, NativeStepOptions)
    args = parser.parse_args(argv)
    config = parse_mode(args.mode).config(
        model=args.model, max_num_seqs=max(args.tokens), num_threads=args.threads, kv_cache_memory_mb=args.kv_cache_mb
    )
    runner, _ = load_model(config)
    torch.set_num_threads(args.threads)
    cells = [(t, p) for t in args.tokens for p in args.positions]
    check_cells(runner, cells)
    runs: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    for _ in range(args.repeats):
        for t, p in cells:
            runs[(t, p)].append(step_ms(runner, t, p, args.iters))
    rows = [
        {
            "tokens": t,
            "position": p,
            "step_ms": statistics.median(runs[(t, p)]),
            "min": min(runs[(t, p)]),
            "max": max(runs[(t, p)]),
        }
        for t, p in cells
    ]
    print_table(rows, f"native step + head, {args.mode}, median of {args.repeats} (ms)")
    emit(
        {
            "benchmark": "native_step",
            "cpu": cpu_model(),
            "mode": args.mode,
            "kernel": runner.kernel_path,
            "kernels_from": str(Path(disagg_kernels.__file__).parent),
            "threads": args.threads,
            "iters": args.iters,
            "rows": rows,
            "runs": {f"{t}x{p}": runs[(t, p)] for t, p in cells},
        },
        args.out,
    )


if __name__ == "__main__":
    main()
