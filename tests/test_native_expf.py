"""The native step's exponentials (`disagg_kernels/cpu_expf.h`): 16 at a time on AVX-512, 8 on AVX2, with the C
library's bits.  The step's attention and SiLU were written against the library's scalar expf; the vector one must
not move a single probability (the step's outputs are held bit for bit across builds and batch widths)."""

import ctypes

import numpy as np
import pytest
from native_kernels import native_for

MARCHES = ["native", "haswell"]  # the vector paths (the portable build calls the library itself)
F32 = ctypes.c_void_p


def _lib(kernel_builds, march: str):
    lib = native_for(kernel_builds, march).library
    for name in ("disagg_step_expf", "disagg_library_expf"):
        getattr(lib, name).argtypes = [F32, ctypes.c_int64, F32]
    lib.disagg_step_silu.argtypes = [F32, F32, ctypes.c_int64, F32]
    return lib


def _special() -> np.ndarray:
    """The library's thresholds and their neighbours, zeros, infinities, NaNs, subnormals, the largest floats."""
    edges = [88.72283172607422, -103.97207641601562, -103.27892303466797, 88.0, -88.0, 0.0, -87.33654]
    near = [np.nextafter(np.float32(e), np.float32(d), dtype=np.float32) for e in edges for d in (-1e9, 1e9)]
    bits = np.array(
        [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x00000001, 0x80000001]
        + [0x007FFFFF, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x80000000],
        dtype=np.uint32,
    )
    return np.concatenate([np.float32(edges), np.float32(near), bits.view(np.float32)])


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


@pytest.mark.parametrize("march", MARCHES)
def test_the_steps_expf_has_the_librarys_bits(march, kernel_builds):
    """Every 97th float's bit pattern (44 million: every sign, exponent and the mantissas between), the softmax's
    range [-104, 0] densely, and the special cases, the last 5 through the vector tail; NaN for NaN."""
    lib = _lib(kernel_builds, march)
    strided = np.arange(0, 2**32 - 97, 97, dtype=np.uint32).view(np.float32)
    x = np.concatenate([strided, np.linspace(-104.0, 0.0, 3_000_001, dtype=np.float32), _special()])
    assert x.size % 16 and x.size % 8  # a tail the vector loop masks
    step, library = np.empty_like(x), np.empty_like(x)
    lib.disagg_step_expf(x.ctypes.data, x.size, step.ctypes.data)
    lib.disagg_library_expf(x.ctypes.data, x.size, library.ctypes.data)
    same = _same(step, library)
    assert same.all(), f"{(~same).sum()} differ, first at {x[~same][0]!r}: {step[~same][0]!r} vs {library[~same][0]!r}"


@pytest.mark.parametrize("march", MARCHES)
def test_the_steps_silu_is_the_scalar_formula_with_the_librarys_exp(march, kernel_builds):
    """silu(g) * up = g / (1 + exp(-g)) * up, each operation in float32, over spans with a tail (n % 16 = 7)."""
    lib = _lib(kernel_builds, march)
    rng = np.random.default_rng(0)
    g = np.concatenate([rng.normal(0, 4, 100_000), [-104.0, -90.0, 0.0, -0.0, 50.0, 89.0, np.inf, -np.inf]])
    g = g[: 16 * (g.size // 16) + 7].astype(np.float32)
    up = rng.normal(0, 1, g.size).astype(np.float32)
    out, e = np.empty_like(g), np.empty_like(g)
    lib.disagg_step_silu(g.ctypes.data, up.ctypes.data, g.size, out.ctypes.data)
    minus = -g
    lib.disagg_library_expf(minus.ctypes.data, g.size, e.ctypes.data)
    with np.errstate(over="ignore", invalid="ignore"):
        want = g / (np.float32(1.0) + e) * up
    same = _same(out, want)
    assert same.all(), f"{(~same).sum()} differ, first at g = {g[~same][0]!r}"
