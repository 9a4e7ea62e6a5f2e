"""The int16-activation block matmuls side by side: the row kernel (cpu_dot8.cpp), the blocked GEMM (cpu_gemm8.cpp)
and weights packed once into panels (cpu_panel16.cpp), over one decoder stack of the default model's shapes.

Each pass runs the 4 matrices of every layer (QKV, O, gate/up, down; random Q4_1 blocks of the shapes SmolLM2-135M
has, 30 layers: 106M weights, no LM head) on `rows` rows of x, as a step of that many tokens does.  Kernels and row
counts are interleaved within each repeat; figures are medians (min-max) of the repeats, each the best of
`--inner` passes (the best of a few is what a warm step costs; the repeats carry the machine's spread).

    .venv/bin/python -m bench.block_matmul --rows 1 2 4 5 8 16 32 64 512 --repeats 5 \\
        --out bench/results/block_matmul_panels.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import torch

from bench.common import emit
from bench.dynamo_router import cpu_model
from disagg.model_store import cache_root
from disagg.options import add_options
from disagg_kernels.cpu_quant import BlockFormat, BlockWeight, NativeKernels, PanelWeight, load_native, quantize

# (N, K) of one layer's matrices: fused QKV, O, fused gate/up, down (SmolLM2-135M)
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
KERNELS = ("rows", "blocked", "panels")


@dataclass
class BlockMatmulOptions:
    rows: list[int] = field(
        default_factory=lambda: [1, 2, 4, 5, 8, 16, 32, 64, 512], metadata={"nargs": "+", "help": "rows of x per step"}
    )
    layers: int = field(default=30, metadata={"help": "decoder layers (the default model has 30)"})
    repeats: int = field(default=5, metadata={"help": "interleaved repeats"})
    inner: int = field(default=3, metadata={"help": "passes per measurement (its best is kept)"})
    threads: int = field(default=2, metadata={"help": "kernel threads"})
    out: str = field(default="", metadata={"help": "JSON file for the results (none: print only)"})


def _pass(native: NativeKernels, kernel: str, xs: list[torch.Tensor], mats: list[tuple[BlockWeight, PanelWeight]]):
    for i, (blocks, panels) in enumerate(mats):
        x = xs[i % len(SHAPES)]
        if kernel == "panels":
            native.matmul_panels(x, panels)
        else:
            native.matmul(x, blocks, 16, blocked=kernel == "blocked")


def _time(native: NativeKernels, kernel: str, rows: int, mats, inner: int) -> float:
    xs = [torch.randn(rows, k) for _, k in SHAPES]
    best = float("inf")
    for _ in range(inner):
        start = time.perf_counter()
        _pass(native, kernel, xs, mats)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, BlockMatmulOptions)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    native, why = load_native(cache_root() / "kernels")
    if native is None or not native.panels or not native.blocked:
        raise SystemExit(f"the panel and blocked kernels need AVX-512 VNNI and a compiler here ({why or 'no VNNI'})")
    gen = torch.Generator().manual_seed(0)
    blocks = [quantize(torch.randn(n, k, generator=gen) * 0.05, BlockFormat.Q4_1) for _ in range(args.layers)
              for n, k in SHAPES]  # fmt: skip
    mats = [(b, native.pack_panels(b)) for b in blocks]
    for kernel in KERNELS:  # warm-up: the libraries' first calls, the threads' buffers
        _time(native, kernel, max(args.rows), mats, 1)
    samples: dict[tuple[str, int], list[float]] = {(k, r): [] for k in KERNELS for r in args.rows}
    for _ in range(args.repeats):
        for rows in args.rows:
            for kernel in KERNELS:
                samples[kernel, rows].append(_time(native, kernel, rows, mats, args.inner))
    table = []
    print(f"{cpu_model()}, {args.threads} threads; ms per pass over {args.layers} layers, median (min-max)")
    lines = []
    for rows in args.rows:
        cell = {k: samples[k, rows] for k in KERNELS}
        med = {k: statistics.median(v) for k, v in cell.items()}
        best_other = min(("rows", "blocked"), key=lambda k: med[k])
        row = {"rows": rows, **{k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in cell.items()}}
        row["panels_vs_best_other"] = med[best_other] / med["panels"]
        row["met"] = max(cell["panels"]) < min(cell[best_other])
        table.append(row)
        lines.append(
            f"rows {rows:4d}: "
            + "  ".join(f"{k} {med[k]:.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in cell.items())
            + f"  panels {row['panels_vs_best_other']:.2f}x the {best_other} kernel{', met' if row['met'] else ''}"
        )
    print("\n".join(lines))
    meta = {"cpu": cpu_model(), "threads": args.threads, "layers": args.layers, "repeats": args.repeats}
    samples_out = {f"{k}/{r}": v for (k, r), v in samples.items()}
    emit({"meta": meta, "rows": table, "samples": samples_out}, args.out or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
