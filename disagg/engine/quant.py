"""Quantized weights: `--quantization none | int8 | q4`, chosen once at start-up.

- `int8`: any HF checkpoint, each linear layer rounded at load to 8-bit blocks: one scale and one min per 32
  weights along the input (w = d * q + m, q in 0..255), finer than per-channel scales.  The min makes the 255
  steps span each block's own range, so a checkpoint that was itself 4-bit (the default model) is exact in it.
- `q4`: the model's GGUF file served from its own Q4_0 / Q4_1 / Q8_0 blocks (engine/gguf.py): no float32 copy of
  the weights is kept, and since the default model *is* those blocks, the results equal the float32 engine's up to
  float summation order.  A model with no GGUF file is rounded to Q4_1 at load instead (lossy, like int8).

Activations stay float32: the kernels de-quantize a block in registers and accumulate in float32
(disagg_kernels/cpu_quant.py).  Small batches (decode) go through the block kernel, which reads 5-8.5 bits per
weight instead of 32; a batch wider than `QuantConfig.direct_rows` (a prefill chunk) de-quantizes the matrix into
one reused float32 buffer and runs torch's GEMM, since there the arithmetic, not the weight bytes, is the cost.

CPU only: a CUDA engine with a quantization is refused at start-up (the GPU kernels are not built yet).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from disagg.modes import Quantization
from disagg_kernels.cpu_quant import (
    QK,
    BlockFormat,
    BlockWeight,
    NativeKernels,
    dequantize_reference,
    load_native,
    matmul_reference,
    quantize,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantConfig:
    # batches of at most this many rows go through the block kernel; wider ones de-quantize and use torch's GEMM
    direct_rows: int = 16


class QuantKernels:
    """The block matmul this process uses: the compiled kernel, or the torch reference when it cannot be built."""

    def __init__(self, native: NativeKernels | None, reason: str = "") -> None:
        self.native = native
        self.reason = reason

    @property
    def name(self) -> str:
        return f"native-{self.native.isa}" if self.native is not None else "torch-reference"

    def matmul(self, x: torch.Tensor, w: BlockWeight) -> torch.Tensor:
        if self.native is not None:
            return self.native.matmul(x, w)
        return matmul_reference(x, w)

    def dequantize(self, w: BlockWeight, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.native is not None:
            return self.native.dequantize(w, out)
        full = dequantize_reference(w)
        return full if out is None else out.copy_(full)


_KERNELS: QuantKernels | None = None


def quant_kernels() -> QuantKernels:
    """Built (or found in the cache) once per process."""
    global _KERNELS
    if _KERNELS is None:
        from disagg.model_store import cache_root

        native, reason = load_native(cache_root() / "kernels")
        _KERNELS = QuantKernels(native, reason)
        if native is None:
            log.warning(
                "quantized matmul: the native kernel could not be built (%s); using the torch reference", reason
            )
        else:
            log.info("quantized matmul: native kernel for %s", native.isa)
    return _KERNELS


class _Scratch:
    """One float32 buffer shared by every layer's de-quantization (layers run one after another)."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def get(self, n: int, k: int) -> torch.Tensor:
        if self.buffer.numel() < n * k:
            self.buffer = torch.empty(n * k)
        return self.buffer[: n * k].view(n, k)


class QuantLinear(nn.Module):
    """A linear layer over a BlockWeight (float32 in and out)."""

    def __init__(
        self,
        weight: BlockWeight,
        bias: torch.Tensor | None,
        kernels: QuantKernels,
        scratch: _Scratch,
        config: QuantConfig,
    ) -> None:
        super().__init__()
        self.weight_blocks = weight
        self.bias = None if bias is None else bias.detach().float().clone()
        self.kernels, self.scratch, self.config = kernels, scratch, config
        self.out_features, self.in_features = weight.shape
        self.weight_bytes = weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= self.config.direct_rows:
            out = self.kernels.matmul(flat, self.weight_blocks)
            if self.bias is not None:
                out += self.bias
        else:
            full = self.kernels.dequantize(self.weight_blocks, self.scratch.get(self.out_features, self.in_features))
            out = F.linear(flat, full, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


class QuantEmbedding(nn.Module):
    """A token embedding kept in blocks: a lookup de-quantizes only the rows it reads."""

    def __init__(self, weight: BlockWeight) -> None:
        super().__init__()
        self.weight_blocks = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return dequantize_reference(self.weight_blocks.rows(flat)).view(*ids.shape, -1)


class QuantFactory:
    """Builds the quantized modules of one model, sharing the kernels and one scratch buffer."""

    def __init__(self, kernels: QuantKernels, config: QuantConfig | None = None) -> None:
        self.kernels, self.config, self.scratch = kernels, config or QuantConfig(), _Scratch()

    def linear(self, weight: BlockWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        return QuantLinear(weight, bias, self.kernels, self.scratch, self.config)

    def from_float(self, module: nn.Module, fmt: BlockFormat) -> QuantLinear:
        assert isinstance(module, nn.Linear)
        return self.linear(quantize(module.weight, fmt), module.bias)


def check_quantizable(
    mode: Quantization, device: torch.device, dtype: torch.dtype, input_widths: dict[str, int] | None = None
) -> None:
    """Start-up checks: a clear error naming the option, never a failure mid-request.  `input_widths`: the
    model's matrix input widths by name, each blocked along by 32."""
    if mode is Quantization.NONE:
        return
    for name, width in (input_widths or {}).items():
        if width % QK:
            raise ValueError(
                f"--quantization {mode.value}: the model's {name} ({width}) is not a multiple of the block size {QK}"
            )
    if device.type != "cpu":
        raise ValueError(f"--quantization {mode.value} runs on CPU only (device {device.type}); use --device cpu")
    if dtype != torch.float32:
        raise ValueError(f"--quantization {mode.value} computes in float32; drop --dtype {dtype} (or use 'auto')")


def gguf_file(model_dir: Path) -> Path | None:
    """The GGUF file a `q4` engine serves from: one in the model directory, or the default model's own."""
    found = sorted(model_dir.glob("*.gguf"))
    if found:
        return found[0]
    from disagg.model_store import default_gguf_for

    return default_gguf_for(model_dir)
