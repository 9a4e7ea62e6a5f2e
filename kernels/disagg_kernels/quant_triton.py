"""Block-quantized matmul in Triton: the GPU path of `--quantization` (the CPU one is cpu_quant.cpp).

`block_matmul_triton(x, w)` computes x @ W.T for a `BlockWeight` W (Q4_0 / Q4_1 / Q8_0 / U8 blocks of 32 along K,
the layout cpu_quant.py documents) without ever making the float matrix: each program de-quantizes a tile of
blocks in registers and accumulates in float32, so a decode step reads 4.5-8.5 bits per weight.  Activations may
be float32, bfloat16 or float16 (the output has their dtype).  Every weight w = d * q + m with m = -8d for Q4_0
and 0 for Q8_0, so a block contributes d * (x . q) + m * sum(x): one dot and one sum per block.

Tests run it under TRITON_INTERPRET=1 against `matmul_reference` (tests/test_quant_triton.py).
"""

from __future__ import annotations

import torch

from disagg_kernels.cpu_quant import QK, BlockFormat, BlockWeight

try:  # Triton is optional at import time so the CPU paths work anywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

HALF = QK // 2  # a 4-bit block's byte j holds element j (low nibble) and element j + 16 (high nibble)
BLOCK_ROWS = 16  # activation rows per program
BLOCK_N = 32  # output columns per program

if triton is not None:

    @triton.jit
    def _block_matmul_kernel(X, QS, D, M, Y, rows, cols, num_blocks,
                             stride_xr, stride_qn, stride_dn, stride_yr,
                             CODES: tl.constexpr, HAS_MIN: tl.constexpr, HALF_QK: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        r_ok = r < rows
        c_ok = c < cols
        j = tl.arange(0, HALF_QK)
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for b in range(0, num_blocks):
            x_base = X + r[:, None] * stride_xr + b * (2 * HALF_QK)
            x_lo = tl.load(x_base + j[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32)
            x_hi = tl.load(x_base + HALF_QK + j[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32)
            d = tl.load(D + c * stride_dn + b, mask=c_ok, other=0.0).to(tl.float32)
            if CODES == 0:  # 4-bit: 16 bytes per block, two codes per byte
                packed = tl.load(QS + c[:, None] * stride_qn + b * HALF_QK + j[None, :], mask=c_ok[:, None], other=0)
                q_lo = (packed & 0x0F).to(tl.float32)
                q_hi = (packed >> 4).to(tl.float32)
            else:  # 8-bit: 32 bytes per block
                base = QS + c[:, None] * stride_qn + b * (2 * HALF_QK)
                lo = tl.load(base + j[None, :], mask=c_ok[:, None], other=0)
                hi = tl.load(base + HALF_QK + j[None, :], mask=c_ok[:, None], other=0)
                if CODES == 1:  # Q8_0: the bytes are int8 bit patterns
                    q_lo = lo.to(tl.int8, bitcast=True).to(tl.float32)
                    q_hi = hi.to(tl.int8, bitcast=True).to(tl.float32)
                else:  # U8
                    q_lo = lo.to(tl.float32)
                    q_hi = hi.to(tl.float32)
            xq = tl.sum(x_lo[:, None, :] * q_lo[None, :, :], 2) + tl.sum(x_hi[:, None, :] * q_hi[None, :, :], 2)
            acc += xq * d[None, :]
            if HAS_MIN:
                m = tl.load(M + c * stride_dn + b, mask=c_ok, other=0.0).to(tl.float32)
                acc += (tl.sum(x_lo, 1) + tl.sum(x_hi, 1))[:, None] * m[None, :]
            elif CODES == 0:  # Q4_0: q - 8
                acc -= 8.0 * (tl.sum(x_lo, 1) + tl.sum(x_hi, 1))[:, None] * d[None, :]
        tl.store(Y + r[:, None] * stride_yr + c[None, :], acc.to(Y.dtype.element_ty),
                 mask=r_ok[:, None] & c_ok[None, :])


def block_matmul_triton(x: torch.Tensor, w: BlockWeight) -> torch.Tensor:
    """x [rows, K] (float32 / bfloat16 / float16) times the block matrix's transpose: [rows, N] in x's dtype."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    rows, k = x.shape
    n = w.shape[0]
    if k != w.shape[1]:
        raise ValueError(f"matmul of {tuple(x.shape)} with a ({n}, {w.shape[1]}) block matrix")
    if w.fmt is BlockFormat.F32:  # the CPU native step's view of float32 weights; a GPU runs those through torch
        raise ValueError("F32 blocks are read by the CPU kernels only")
    x = x.contiguous()
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    codes = 0 if w.fmt.four_bit else 1 if w.fmt is BlockFormat.Q8_0 else 2
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(n, BLOCK_N))
    _block_matmul_kernel[grid](
        x, w.qs, w.d, w.m if w.m is not None else w.d, y, rows, n, k // QK,
        x.stride(0), w.qs.stride(0), w.d.stride(0), y.stride(0),
        CODES=codes, HAS_MIN=w.m is not None, HALF_QK=HALF, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_N,
    )
    return y
