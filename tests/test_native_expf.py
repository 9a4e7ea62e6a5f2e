"""The native step's exponentials (`disagg_kernels/cpu_expf.h`): 16 at a time on AVX-512, with the C library's
bits.  The step's attention and SiLU were written against the library's scalar expf; the vector one must not
move a single probability (the step's outputs are held bit for bit across builds and batch widths)."""

import ctypes
import math

import numpy as np
import pytest
from native_kernels import native_for


def _both(kernel_builds, march: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lib = native_for(kernel_builds, march).library
    for name in ("disagg_step_expf", "disagg_library_expf"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(x, dtype=np.float32)
    step, library = np.empty_like(x), np.empty_like(x)
    lib.disagg_step_expf(x.ctypes.data, x.size, step.ctypes.data)
    lib.disagg_library_expf(x.ctypes.data, x.size, library.ctypes.data)
    return step, library


def _special() -> np.ndarray:
    """The library's thresholds and their neighbours, zeros, infinities, NaNs, subnormals, the largest floats."""
    edges = [88.72283172607422, -103.97207641601562, -103.27892303466797, 88.0, -88.0, 0.0, -87.33654]
    near = [np.nextafter(np.float32(e), np.float32(d), dtype=np.float32) for e in edges for d in (-1e9, 1e9)]
    bits = np.array(
        [
            0x7F800000,
            0xFF800000,
            0x7FC00000,
            0xFFC00001,
            0x7F800001,
            0x00000001,
            0x80000001,
            0x007FFFFF,
            0x807FFFFF,
            0x7F7FFFFF,
            0xFF7FFFFF,
            0x80000000,
        ],
        dtype=np.uint32,
    )
    return np.concatenate([np.float32(edges), np.float32(near), bits.view(np.float32)])


@pytest.mark.parametrize("march", ["native", "haswell", "x86-64"])
def test_the_steps_expf_has_the_librarys_bits(march, kernel_builds):
    """Every 97th float's bit pattern (44 million: every sign, exponent and the mantissas between), the
    softmax's range [-104, 0] densely, and the special cases; NaN for NaN."""
    strided = np.arange(0, 2**32, 97, dtype=np.uint64).astype(np.uint32).view(np.float32)
    dense = np.linspace(-104.0, 0.0, 3_000_001, dtype=np.float32)
    x = np.concatenate([strided, dense, _special(), _special()[:5]])  # the last: a tail shorter than 16
    step, library = _both(kernel_builds, march, x)
    same = (step.view(np.uint32) == library.view(np.uint32)) | (np.isnan(step) & np.isnan(library))
    assert same.all(), (
        f"{(~same).sum()} differ, first at x = {x[~same][0]!r}: {step[~same][0]!r} vs {library[~same][0]!r}"
    )
    assert library[np.isfinite(x)].min() >= 0.0 and math.isclose(float(step[x == 0.0][0]), 1.0)
