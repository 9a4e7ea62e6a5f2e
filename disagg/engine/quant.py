"""Quantized weights: `--quantization none | int8 | q4`, chosen once at start-up.

- `int8`: any HF checkpoint, each linear layer rounded at load to 8-bit blocks: one scale and one min per 32
  weights along the input (w = d * q + m, q in 0..255), finer than per-channel scales.  The min makes the 255
  steps span each block's own range, so a checkpoint that was itself 4-bit (the default model) is exact in it.
- `q4`: the model's GGUF file served from its own Q4_0 / Q4_1 / Q8_0 blocks (engine/gguf.py): no float32 copy of
  the weights is kept, and since the default model *is* those blocks, the results equal the float32 engine's up to
  float summation order.  A model with no GGUF file is rounded to Q4_1 at load instead (lossy, like int8).

The kernels are a seam (`BlockKernels`), chosen once from the device: on CPU the native C++ kernel (or its torch
reference when no compiler is found), float32 activations, or (`--quant-activations int16 | int8`) activations
rounded per block of 32 and integer dot products (disagg_kernels/cpu_dot8.cpp: AVX-512 VNNI, AVX2, portable); on
CUDA the Triton kernel (disagg_kernels/quant_triton.py), float32, bfloat16 or float16 activations.  They
de-quantize a block in registers and accumulate in float32.  Batches of up to `QuantConfig.direct_rows` rows
(decode, short chunks) go through the block kernel, which reads 5-8.5 bits per weight instead of 32, and on CPU
through the native whole-stack step (engine/native_step.py).  With int16 activations, batches of
`QuantConfig.blocked_rows` rows or more, at any width, take the blocked integer GEMM (disagg_kernels/cpu_gemm8.cpp,
AVX-512 VNNI): the same integer dots, laid out so that the arithmetic, not the weight bytes, sets the pace.  Any
other wider batch (a prefill chunk) de-quantizes the matrix into one reused float32 buffer and runs torch's GEMM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from disagg.modes import Activations, Quantization
from disagg_kernels.cpu_quant import (
    QK,
    BlockFormat,
    BlockWeight,
    NativeKernels,
    PanelWeight,
    dequantize_reference,
    load_native,
    matmul_reference,
    quantize,
)
from disagg_kernels.quant_triton import block_matmul_triton

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantConfig:
    # batches of at most this many rows go through the block kernel; wider ones de-quantize and use torch's GEMM.
    # The block kernel wins up to ~110 rows here (a 3072 x 576 Q4_1 matrix at 64 rows: 2.7 ms against 3.6 ms)
    direct_rows: int = 64
    # a float32 model's steps of at most this many tokens take the native step (its matrices read in place); from
    # ~8 rows oneDNN's packed GEMM beats the row-by-row kernel (default model: 133 vs 89-97 tok/s at N = 4,
    # 150 vs 158 at N = 8)
    float_rows: int = 4
    # 8 / 16: the block kernel rounds its activations to int8 / int16 blocks first (--quant-activations; CPU only)
    activation_bits: int = 0
    # with int16 activations, steps of at least this many rows take the blocked integer GEMM (cpu_gemm8.cpp) where
    # it is built (AVX-512 VNNI), at any width: it ties the row kernel at 4 rows and wins from 8 (docs/benchmarks.md,
    # "A blocked integer GEMM for batches of many rows")
    blocked_rows: int = 8
    # with int16 activations, pack each matrix once at load into panels of 16 output columns (cpu_panel16.cpp) where
    # the kernel is built (AVX-512 VNNI): every step, of any width, reads them, and the row layout is released.
    # Per matrix row it ties or beats both kernels above at 1-512 rows, most at 4-16 rows (docs/benchmarks.md,
    # "Weights packed once into panels")
    panels: bool = True
    # every row the same bits whatever the step's row count (an engine with a quantized KV cache, whose rounding
    # turns a last-bit difference into another token): steps of any width take the block kernels' per-row
    # arithmetic, never the blocked GEMM or the de-quantized float32 GEMM (prefill chunks wider than direct_rows
    # cost more: the block kernels lose to the GEMM from ~110 rows)
    batch_invariant: bool = False

    @property
    def blocked_from(self) -> int:
        """Rows from which the matmuls take the blocked GEMM; 0: never.  int16 only: int8 activations'
        teacher-forced agreement sits at the 97% bar and moves across it with the float summation order alone
        (docs/benchmarks.md), so int8 layers keep the row kernel's order (their LM head rounds to int16,
        `for_head`, and takes the blocked GEMM as int16's does)."""
        return self.blocked_rows if self.activation_bits == 16 and not self.batch_invariant else 0

    @property
    def wants_panels(self) -> bool:
        """Whether matrices are packed into panels (int16 activations, `panels` on), where the kernels can."""
        return self.panels and self.activation_bits == 16

    def for_head(self) -> QuantConfig:
        """The LM head's: int16 where the layers round to int8.  The head picks the top-1 token, and int8 there
        costs most of int8's teacher-forced agreement (docs/benchmarks.md); int16 costs ~0.2 ms a step."""
        return replace(self, activation_bits=16) if self.activation_bits == 8 else self


class BlockKernels(Protocol):
    """What a QuantLinear needs: a block matmul and a de-quantization, and the activation dtypes they take."""

    @property
    def name(self) -> str: ...

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]: ...

    @property
    def blocked(self) -> bool:
        """Whether integer-activation matmuls have a blocked GEMM for wide batches (else they run row by row)."""
        ...

    def matmul(
        self, x: torch.Tensor, w: BlockWeight, activation_bits: int = 0, *, blocked: bool = False
    ) -> torch.Tensor: ...

    def pack(self, w: BlockWeight) -> PanelWeight | None:
        """`w` packed into panels for int16 activations, or None where these kernels have no panel kernel."""
        ...

    def matmul_panels(self, x: torch.Tensor, w: PanelWeight) -> torch.Tensor: ...

    def panel_rows(self, w: PanelWeight, index: torch.Tensor) -> torch.Tensor:
        """Rows of a packed matrix as float32 (a tied embedding's lookup)."""
        ...

    def dequantize(self, w: BlockWeight, out: torch.Tensor | None = None) -> torch.Tensor: ...


class QuantKernels:
    """The CPU block matmul: the compiled kernel, or the torch reference when it cannot be built."""

    dtypes = (torch.float32,)

    def __init__(self, native: NativeKernels | None, reason: str = "") -> None:
        self.native = native
        self.reason = reason

    @property
    def name(self) -> str:
        return f"native-{self.native.isa}" if self.native is not None else "torch-reference"

    @property
    def blocked(self) -> bool:
        return self.native is not None and self.native.blocked

    def matmul(
        self, x: torch.Tensor, w: BlockWeight, activation_bits: int = 0, *, blocked: bool = False
    ) -> torch.Tensor:
        if self.native is not None:
            return self.native.matmul(x, w, activation_bits, blocked=blocked)
        return matmul_reference(x, w, activation_bits)

    def pack(self, w: BlockWeight) -> PanelWeight | None:
        if self.native is None or not self.native.panels or w.fmt is BlockFormat.F32:
            return None
        return self.native.pack_panels(w)

    def matmul_panels(self, x: torch.Tensor, w: PanelWeight) -> torch.Tensor:
        if self.native is None:  # never: pack() makes panels only with the native kernels
            raise ValueError("panels are read by the native kernels only")
        return self.native.matmul_panels(x, w)

    def panel_rows(self, w: PanelWeight, index: torch.Tensor) -> torch.Tensor:
        if self.native is None:  # never: as above
            raise ValueError("panels are read by the native kernels only")
        return self.native.panel_rows(w, index)

    def dequantize(self, w: BlockWeight, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.native is not None:
            return self.native.dequantize(w, out)
        full = dequantize_reference(w)
        return full if out is None else out.copy_(full)


class TritonQuantKernels:
    """The GPU block matmul (Triton; under TRITON_INTERPRET=1 it runs on CPU tensors, which is how it is tested);
    a wide batch de-quantizes the matrix with torch on the weights' device."""

    name = "triton"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    blocked = False

    def matmul(
        self, x: torch.Tensor, w: BlockWeight, activation_bits: int = 0, *, blocked: bool = False
    ) -> torch.Tensor:
        if activation_bits:  # refused at start-up (check_quantizable); never reached by a served request
            raise ValueError("--quant-activations int8 / int16 run on the CPU kernels only")
        return block_matmul_triton(x, w)

    def pack(self, w: BlockWeight) -> PanelWeight | None:
        return None  # int16 activations run on the CPU kernels only

    def matmul_panels(self, x: torch.Tensor, w: PanelWeight) -> torch.Tensor:
        raise ValueError("--quant-activations int16 runs on the CPU kernels only")

    def panel_rows(self, w: PanelWeight, index: torch.Tensor) -> torch.Tensor:
        raise ValueError("--quant-activations int16 runs on the CPU kernels only")

    def dequantize(self, w: BlockWeight, out: torch.Tensor | None = None) -> torch.Tensor:
        full = dequantize_reference(w)
        return full if out is None else out.copy_(full)


_KERNELS: QuantKernels | None = None


def quant_kernels(device: torch.device) -> BlockKernels:
    """The device's kernels: Triton on CUDA; on CPU the native build (or found in the cache) once per process."""
    if device.type == "cuda":
        return TritonQuantKernels()
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
            dots = "AVX-512 VNNI" if native.vnni else "AVX2 or the portable loop, as built"
            log.info(
                "quantized matmul: native kernel for %s (integer-activation dots on %s; blocked GEMM for wide "
                "steps: %s)",
                native.isa,
                dots,
                "yes" if native.blocked else "no, row by row",
            )
    return _KERNELS


class _Scratch:
    """One float32 buffer shared by every layer's de-quantization (layers run one after another)."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def get(self, n: int, k: int, device: torch.device) -> torch.Tensor:
        if self.buffer.numel() < n * k or self.buffer.device != device:
            self.buffer = torch.empty(n * k, device=device)
        return self.buffer[: n * k].view(n, k)


class QuantLinear(nn.Module):
    """A linear layer over a BlockWeight (activations in one of the kernels' dtypes; float32 on CPU), or over the
    same blocks packed into panels (`QuantConfig.panels`), which then serve every step and replace the row layout."""

    def __init__(
        self,
        weight: BlockWeight,
        bias: torch.Tensor | None,
        kernels: BlockKernels,
        scratch: _Scratch,
        config: QuantConfig,
    ) -> None:
        super().__init__()
        self.weight_blocks: BlockWeight | PanelWeight = weight
        self.bias = None if bias is None else bias.detach().float().clone()
        self.kernels, self.scratch = kernels, scratch
        self.out_features, self.in_features = weight.shape
        self.config = config

    @property
    def config(self) -> QuantConfig:
        return self._config

    @config.setter
    def config(self, config: QuantConfig) -> None:
        """A config that wants panels packs the blocks now (once; the LM head's `for_head` may ask after load)."""
        w = self.weight_blocks
        if isinstance(w, PanelWeight) and not config.wants_panels:
            raise ValueError("a matrix packed into panels is read with int16 activations only")
        if isinstance(w, BlockWeight) and config.wants_panels:
            self.weight_blocks = self.kernels.pack(w) or w
        self._config = config

    @property
    def weight_bytes(self) -> int:
        return self.weight_blocks.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows, bits, w = flat.shape[0], self.config.activation_bits, self.weight_blocks
        # int16 activations stay integer at any width where the panels or the blocked GEMM are built (the same
        # integer dots as a narrow step); otherwise a wide step runs float32 activations over the de-quantized matrix
        blocked = self.kernels.blocked and 0 < self.config.blocked_from <= rows
        if (
            isinstance(w, BlockWeight)
            and rows > self.config.direct_rows
            and not (blocked or self.config.batch_invariant)
        ):
            scratch = self.scratch.get(self.out_features, self.in_features, flat.device)
            full = self.kernels.dequantize(w, scratch).to(flat.dtype)
            out = F.linear(flat, full, None if self.bias is None else self.bias.to(flat.dtype))
        else:
            if isinstance(w, PanelWeight):
                out = self.kernels.matmul_panels(flat, w)
            else:
                out = self.kernels.matmul(flat, w, bits, blocked=blocked)
            if self.bias is not None:
                out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


class QuantEmbedding(nn.Module):
    """A token embedding kept in blocks: a lookup de-quantizes only the rows it reads.  Tied to the LM head (a GGUF
    file with no output matrix), it reads the head's matrix in whatever layout the head holds - packed into panels
    once int16 activations ask for them - instead of keeping a second copy."""

    def __init__(
        self,
        weight: BlockWeight,
        kernels: BlockKernels,
        dtype: torch.dtype = torch.float32,
        head: QuantLinear | None = None,
    ) -> None:
        super().__init__()
        self.kernels, self.dtype = kernels, dtype
        self._own: BlockWeight | None = None if head is not None else weight
        self._head = [head] if head is not None else []  # a list: the head is the model's module, not this one's

    @property
    def weight_blocks(self) -> BlockWeight | PanelWeight:
        if self._head:
            return self._head[0].weight_blocks
        assert self._own is not None  # one of the two is set at construction
        return self._own

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat, w = ids.reshape(-1), self.weight_blocks
        if isinstance(w, PanelWeight):
            rows = self.kernels.panel_rows(w, flat.cpu())
        else:
            rows = dequantize_reference(w.rows(flat))
        return rows.to(self.dtype).view(*ids.shape, -1)


class QuantFactory:
    """Builds the quantized modules of one model, sharing the kernels and one scratch buffer."""

    def __init__(
        self,
        kernels: BlockKernels,
        config: QuantConfig | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.kernels, self.config, self.scratch = kernels, config or QuantConfig(), _Scratch()
        self.device, self.dtype = device or torch.device("cpu"), dtype

    def linear(self, weight: BlockWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        """A QuantLinear with its blocks (and bias) on the factory's device."""
        bias = None if bias is None else bias.to(self.device)
        return QuantLinear(weight.to(self.device), bias, self.kernels, self.scratch, self.config)

    def embedding(self, weight: BlockWeight, head: QuantLinear | None = None) -> QuantEmbedding:
        """`head`: the LM head tied to this embedding (it holds `weight`), whose matrix the lookups then read."""
        return QuantEmbedding(weight.to(self.device), self.kernels, self.dtype, head)

    def from_float(self, module: nn.Module, fmt: BlockFormat) -> QuantLinear:
        assert isinstance(module, nn.Linear)
        return self.linear(quantize(module.weight, fmt), module.bias)


def check_quantizable(
    mode: Quantization,
    kernels: BlockKernels,
    dtype: torch.dtype,
    input_widths: dict[str, int] | None = None,
    activations: Activations = Activations.FLOAT32,
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
    if activations.bits and not isinstance(kernels, QuantKernels):
        raise ValueError(
            f"--quant-activations {activations.value} runs on the CPU kernels only, not on the {kernels.name} ones"
        )
    if dtype not in kernels.dtypes:
        names = [str(d).removeprefix("torch.") for d in kernels.dtypes]
        raise ValueError(
            f"--quantization {mode.value}: the {kernels.name} kernels compute in {names}; drop --dtype "
            f"{str(dtype).removeprefix('torch.')} (or use 'auto')"
        )


def gguf_file(model_dir: Path) -> Path | None:
    """The GGUF file a `q4` engine serves from: one in the model directory, or the default model's own."""
    found = sorted(model_dir.glob("*.gguf"))
    if found:
        return found[0]
    from disagg.model_store import default_gguf_for

    return default_gguf_for(model_dir)
