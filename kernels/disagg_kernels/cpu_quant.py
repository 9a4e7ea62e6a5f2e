"""Block-quantized weights (llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks of 32) and their CPU matmul, with the torch
reference it is tested against.

`BlockWeight` is one matrix in block form: packed codes plus float32 scales (and mins).  `quantize` makes one from
a float matrix (how `--quantization int8` quantizes an HF checkpoint at load); the GGUF reader builds them from the
file's own blocks (`disagg/engine/gguf.py`).  `matmul_reference` / `dequantize_reference` are plain torch.

`NativeKernels` is `cpu_quant.cpp` compiled once per machine with `-march=native`: the compiler targets what the
running CPU has (AVX2 or AVX-512), and the build is cached under a key of the source, the compiler and the CPU
flags, so a machine with another CPU builds its own.  `load_native()` returns None with the reason when no C++
compiler is present; the engine then runs the torch reference and says so at start-up.
"""

from __future__ import annotations

import ctypes
import enum
import subprocess
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from disagg_kernels.native_build import build_library

_ALIGN = 64  # bytes: the panel kernel reads its panels with aligned 512-bit loads
QK = 32  # weights per block (llama.cpp's QK4_0 = QK4_1 = QK8_0 = 32)
_SOURCE = Path(__file__).with_name("cpu_quant.cpp")
# one library: the integer-activation matmuls and the whole-stack step beside the block matmul they call
_KERNEL_FILES = (
    "cpu_dot8.cpp",
    "cpu_gemm8.cpp",
    "cpu_panel16.cpp",
    "cpu_step.cpp",
    "cpu_step_hooks.cpp",
    "cpu_logits.cpp",
)
_SOURCES = (_SOURCE, *(Path(__file__).with_name(name) for name in _KERNEL_FILES))
# what the kernels share and include (part of the build key): the block formats, the int8 KV codec, the attention
_HEADERS = tuple(
    Path(__file__).with_name(name) for name in ("cpu_blocks.h", "cpu_expf.h", "cpu_kv8.h", "cpu_step_attention.h")
)


class BlockFormat(enum.Enum):
    Q4_0 = "q4_0"  # w = d * (q - 8), q in 0..15
    Q4_1 = "q4_1"  # w = d * q + m, q in 0..15
    Q8_0 = "q8_0"  # w = d * q, q in -127..127
    U8 = "u8"  # w = d * q + m, q in 0..255 (how --quantization int8 rounds a float checkpoint)
    F32 = "f32"  # w = q: a float32 model's own matrix, read in place by the native step (d = 1, no m)

    @property
    def four_bit(self) -> bool:
        return self in (BlockFormat.Q4_0, BlockFormat.Q4_1)

    @property
    def has_min(self) -> bool:
        return self in (BlockFormat.Q4_1, BlockFormat.U8)

    @property
    def codes(self) -> int:
        """The kernel's code kind (cpu_quant.cpp `Codes`)."""
        return {BlockFormat.Q8_0: 1, BlockFormat.U8: 2, BlockFormat.F32: 3}.get(self, 0)

    @property
    def bytes_per_weight(self) -> float:
        return {BlockFormat.F32: 4.0, BlockFormat.Q8_0: 1.0, BlockFormat.U8: 1.0}.get(self, 0.5)


@dataclass
class BlockWeight:
    """A [N, K] matrix in blocks of 32 along K: `qs` uint8 [N, K/2] (4-bit: byte j of a block holds element j in
    its low nibble and element j + 16 in its high one, as in GGUF) or [N, K] (Q8_0, int8 bit patterns);
    `d` (and `m`, Q4_1 only) float32 [N, K/32]."""

    fmt: BlockFormat
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        n, k = self.shape
        if k % QK:
            raise ValueError(f"{self.fmt.value}: K={k} is not a multiple of the block size {QK}")
        width = int(k * self.fmt.bytes_per_weight)
        if tuple(self.qs.shape) != (n, width) or self.qs.dtype != torch.uint8:
            raise ValueError(
                f"{self.fmt.value}: codes {tuple(self.qs.shape)} {self.qs.dtype}, want ({n}, {width}) uint8"
            )
        if tuple(self.d.shape) != (n, k // QK) or (self.m is not None and self.m.shape != self.d.shape):
            raise ValueError(f"{self.fmt.value}: scales {tuple(self.d.shape)}, want ({n}, {k // QK})")
        if (self.m is not None) != self.fmt.has_min:
            raise ValueError(f"{self.fmt.value}: mins are given for Q4_1 and U8, and only for them")

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the matrix reads (codes and float32 scales)."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def rows(self, index: torch.Tensor) -> BlockWeight:
        """The rows `index` (an embedding lookup), still in block form."""
        m = None if self.m is None else self.m[index]
        return BlockWeight(self.fmt, self.qs[index], self.d[index], m, (int(index.numel()), self.shape[1]))

    def to(self, device: torch.device) -> BlockWeight:
        m = None if self.m is None else self.m.to(device)
        return BlockWeight(self.fmt, self.qs.to(device), self.d.to(device), m, self.shape)

    def permute_rows(self, order: torch.Tensor) -> BlockWeight:
        m = None if self.m is None else self.m[order].contiguous()
        return BlockWeight(self.fmt, self.qs[order].contiguous(), self.d[order].contiguous(), m, self.shape)

    @staticmethod
    def concat(parts: list[BlockWeight]) -> BlockWeight:
        """Row-wise concatenation (fused projections); every part has the same format and K."""
        fmt, k = parts[0].fmt, parts[0].shape[1]
        if any(p.fmt is not fmt or p.shape[1] != k for p in parts):
            raise ValueError("fused projections must share one block format and input width")
        m = torch.cat([p.m for p in parts if p.m is not None]) if fmt.has_min else None
        n = sum(p.shape[0] for p in parts)
        return BlockWeight(fmt, torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m, (n, k))


@dataclass(frozen=True)
class PanelWeight:
    """A BlockWeight packed once into panels of 16 output columns for int16 activations (cpu_panel16.cpp): the
    same codes at their own width and the same float32 scales, in the order the panel kernel reads them (columns
    padded to a multiple of 16).  `data` is a 64-byte-aligned uint8 view; `NativeKernels.pack_panels` makes one."""

    fmt: BlockFormat
    data: torch.Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the matrix reads."""
        return self.data.numel()


def float_blocks(weight: torch.Tensor) -> BlockWeight:
    """A float32 [N, K] matrix as F32 blocks: its own memory, read in place (no copy; d = 1)."""
    n, k = weight.shape
    w = weight.detach()
    if w.dtype != torch.float32 or not w.is_contiguous():
        raise ValueError("F32 blocks read a contiguous float32 matrix in place")
    return BlockWeight(BlockFormat.F32, w.view(torch.uint8), torch.ones(n, k // QK), None, (n, k))


def quantize(weight: torch.Tensor, fmt: BlockFormat) -> BlockWeight:
    """Round a float [N, K] matrix to blocks the way llama.cpp's reference quantizers do (Q8_0: d = amax / 127;
    Q4_1: d = (max - min) / 15, m = min; Q4_0: d = signed max / -8); U8 like Q4_1 with 255 steps."""
    n, k = weight.shape
    if k % QK:
        raise ValueError(f"cannot quantize a matrix with {k} columns to blocks of {QK}")
    if fmt is BlockFormat.F32:
        return float_blocks(weight.detach().float().contiguous())
    w = weight.detach().float().reshape(n, k // QK, QK)
    if fmt is BlockFormat.Q8_0:
        d = w.abs().amax(-1) / 127.0
        q = torch.round(w / torch.where(d == 0, 1.0, d)[..., None]).clamp(-127, 127).to(torch.int8)
        return BlockWeight(fmt, q.view(torch.uint8).reshape(n, k), d, None, (n, k))
    if fmt.has_min:
        levels = 15.0 if fmt is BlockFormat.Q4_1 else 255.0
        lo, hi = w.amin(-1), w.amax(-1)
        d = (hi - lo) / levels
        q = torch.round((w - lo[..., None]) / torch.where(d == 0, 1.0, d)[..., None]).clamp(0, levels)
        m: torch.Tensor | None = lo
        if fmt is BlockFormat.U8:
            return BlockWeight(fmt, q.to(torch.uint8).reshape(n, k), d, m, (n, k))
    else:
        idx = w.abs().argmax(-1, keepdim=True)
        d = torch.gather(w, -1, idx).squeeze(-1) / -8.0
        q = torch.round(w / torch.where(d == 0, 1.0, d)[..., None] + 8.0).clamp(0, 15)
        m = None
    q = q.to(torch.uint8)
    packed = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)
    return BlockWeight(fmt, packed.reshape(n, k // 2), d, m, (n, k))


def dequantize_reference(w: BlockWeight) -> torch.Tensor:
    """The float32 [N, K] matrix the blocks stand for (torch)."""
    n, k = w.shape
    nb = k // QK
    if w.fmt is BlockFormat.F32:
        return w.qs.view(torch.float32).reshape(n, k).clone()
    if w.fmt is BlockFormat.Q8_0:
        q = w.qs.view(torch.int8).reshape(n, nb, QK).float()
        return (q * w.d[..., None]).reshape(n, k)
    if w.fmt is BlockFormat.U8:
        assert w.m is not None
        return (w.qs.reshape(n, nb, QK).float() * w.d[..., None] + w.m[..., None]).reshape(n, k)
    packed = w.qs.reshape(n, nb, QK // 2)
    q = torch.cat((packed & 0x0F, packed >> 4), dim=-1).float()
    m = w.m if w.m is not None else -8.0 * w.d
    return (q * w.d[..., None] + m[..., None]).reshape(n, k)


def round_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x [B, K] as cpu_dot8.cpp rounds it: to int8 or int16 per block of 32 (scale amax / 127 or / 32767),
    returned de-quantized."""
    b, k = x.shape
    blocks = x.float().reshape(b, k // QK, QK)
    d = blocks.abs().amax(-1, keepdim=True) / float(2 ** (bits - 1) - 1)
    q = torch.round(blocks * torch.where(d > 0, 1.0 / d, 0.0))
    return (q * d).reshape(b, k)


def matmul_reference(x: torch.Tensor, w: BlockWeight, activation_bits: int = 0) -> torch.Tensor:
    """x times the matrix's transpose; `activation_bits` as the kernels apply it (float32 weights keep float32
    activations: the integer dots are for block codes)."""
    rounded = activation_bits and w.fmt is not BlockFormat.F32
    x = round_activations(x, activation_bits) if rounded else x.float()
    return x @ dequantize_reference(w).T


class NativeKernels:
    """The compiled kernels (see the module docstring); `isa` is what the build targets on this CPU."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.disagg_quant_matmul.argtypes = [i32, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i32]
        lib.disagg_quant_matmul.restype = None
        lib.disagg_quant_dequantize.argtypes = [i32, ptr, ptr, ptr, i64, i64, ptr, i32]
        lib.disagg_quant_dequantize.restype = None
        lib.disagg_quant_isa.restype = ctypes.c_char_p
        lib.disagg_quant_matmul_int.argtypes = [i32, *lib.disagg_quant_matmul.argtypes]
        lib.disagg_quant_matmul_int.restype = None
        lib.disagg_quant_gemm_int.argtypes = lib.disagg_quant_matmul_int.argtypes
        lib.disagg_quant_gemm_int.restype = None
        self.library = lib  # cpu_step.StackKernel binds the whole-stack step from it too
        self.isa: str = lib.disagg_quant_isa().decode()
        self.vnni = bool(lib.disagg_quant_int_vnni())  # integer-activation dots on AVX-512 VNNI (else AVX2/portable)
        self.blocked = bool(lib.disagg_quant_gemm_blocked())  # cpu_gemm8.cpp's blocked kernel (else the row one)
        lib.disagg_quant_panels_bytes.argtypes = [i32, i64, i64]
        lib.disagg_quant_panels_bytes.restype = i64
        lib.disagg_quant_pack_panels.argtypes = [i32, ptr, ptr, ptr, i64, i64, ptr, i32]
        lib.disagg_quant_pack_panels.restype = None
        lib.disagg_quant_panels_int16.argtypes = [i32, ptr, i64, i64, ptr, i64, ptr, i32]
        lib.disagg_quant_panels_int16.restype = None
        lib.disagg_quant_panel_rows.argtypes = [i32, ptr, i64, i64, ptr, i64, ptr]
        lib.disagg_quant_panel_rows.restype = None
        self.panels = bool(lib.disagg_quant_panels_built())  # cpu_panel16.cpp's kernel (AVX-512 VNNI)
        lib.disagg_logits_scan.argtypes = [ptr, i64, i64, ptr, ptr, i32]
        lib.disagg_logits_scan.restype = None

    def scan_logits(self, logits: torch.Tensor) -> tuple[list[int], list[bool]]:
        """Per row of float32 CPU logits [B, V], in one pass (cpu_logits.cpp): the index of its first maximum
        (torch.argmax's; unspecified in a row that is not finite) and whether all its values are finite."""
        if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu":
            raise ValueError(f"logits scan of {tuple(logits.shape)} {logits.dtype} on {logits.device}")
        x = logits.contiguous()
        b, v = x.shape
        argmax = torch.empty(b, dtype=torch.int64)
        finite = torch.empty(b, dtype=torch.uint8)
        self.library.disagg_logits_scan(
            x.data_ptr(), b, v, argmax.data_ptr(), finite.data_ptr(), torch.get_num_threads()
        )
        return argmax.tolist(), [bool(f) for f in finite.tolist()]

    def pack_panels(self, w: BlockWeight) -> PanelWeight:
        """`w` packed into panels (cpu_panel16.cpp), for `matmul_panels`; ValueError for float32 blocks."""
        if w.fmt is BlockFormat.F32 or not self.panels:
            raise ValueError(f"panels hold 4- and 8-bit codes on AVX-512 VNNI, not {w.fmt.value} here")
        if not all(t.is_contiguous() and t.device.type == "cpu" for t in (w.qs, w.d, w.m) if t is not None):
            raise ValueError("panels are packed from contiguous CPU blocks")
        n, k = w.shape
        size = self.library.disagg_quant_panels_bytes(w.fmt.codes, n, k)
        raw = torch.empty(size + _ALIGN, dtype=torch.uint8)
        start = -raw.data_ptr() % _ALIGN
        data = raw[start : start + size]  # a view: the tensor keeps its storage alive
        m = w.m.data_ptr() if w.m is not None else None
        self.library.disagg_quant_pack_panels(
            w.fmt.codes, w.qs.data_ptr(), w.d.data_ptr(), m, n, k, data.data_ptr(), torch.get_num_threads()
        )
        return PanelWeight(w.fmt, data, w.shape)

    def panel_rows(self, w: PanelWeight, index: torch.Tensor) -> torch.Tensor:
        """The rows `index` of a packed matrix as float32 [len(index), K] (a tied embedding's lookup)."""
        idx = index.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(idx.numel(), w.shape[1], dtype=torch.float32)
        self.library.disagg_quant_panel_rows(
            w.fmt.codes, w.data.data_ptr(), w.shape[0], w.shape[1], idx.data_ptr(), idx.numel(), out.data_ptr()
        )
        return out

    def matmul_panels(self, x: torch.Tensor, w: PanelWeight) -> torch.Tensor:
        """x [B, K] float32 rounded to int16 per block of 32, times the packed matrix's transpose: [B, N] float32,
        the same integer dots as `matmul(x, blocks, 16)`."""
        b, k = x.shape
        n = w.shape[0]
        if k != w.shape[1] or x.dtype != torch.float32:
            raise ValueError(f"matmul of {tuple(x.shape)} {x.dtype} with a ({n}, {w.shape[1]}) panel matrix")
        x = x.contiguous()
        y = torch.empty(b, n, dtype=torch.float32)
        self.library.disagg_quant_panels_int16(
            w.fmt.codes, x.data_ptr(), b, k, w.data.data_ptr(), n, y.data_ptr(), torch.get_num_threads()
        )
        return y

    def matmul(
        self, x: torch.Tensor, w: BlockWeight, activation_bits: int = 0, *, blocked: bool = False
    ) -> torch.Tensor:
        """x [B, K] float32 times the matrix's transpose: [B, N] float32 (ctypes drops the GIL during the call);
        `activation_bits` 8 or 16: x rounded to int8 / int16 per block of 32 first (cpu_dot8.cpp); `blocked`
        (with them): the same integer dots as a blocked GEMM, for wide x (cpu_gemm8.cpp)."""
        b, k = x.shape
        n = w.shape[0]
        if k != w.shape[1] or x.dtype != torch.float32:
            raise ValueError(f"matmul of {tuple(x.shape)} {x.dtype} with a ({n}, {w.shape[1]}) block matrix")
        x = x.contiguous()
        y = torch.empty(b, n, dtype=torch.float32)
        m = w.m.data_ptr() if w.m is not None else None
        lib = self.library
        if activation_bits:
            fn = partial(lib.disagg_quant_gemm_int if blocked else lib.disagg_quant_matmul_int, activation_bits)
        else:
            fn = lib.disagg_quant_matmul
        fn(
            w.fmt.codes,
            x.data_ptr(),
            b,
            k,
            w.qs.data_ptr(),
            w.d.data_ptr(),
            m,
            n,
            y.data_ptr(),
            torch.get_num_threads(),
        )
        return y

    def dequantize(self, w: BlockWeight, out: torch.Tensor | None = None) -> torch.Tensor:
        n, k = w.shape
        out = torch.empty(n, k, dtype=torch.float32) if out is None else out
        m = w.m.data_ptr() if w.m is not None else None
        self.library.disagg_quant_dequantize(
            w.fmt.codes, w.qs.data_ptr(), w.d.data_ptr(), m, n, k, out.data_ptr(), torch.get_num_threads()
        )
        return out


def build_native(cache_dir: Path, march: str = "native") -> Path:
    """Compile cpu_quant.cpp and the kernels beside it (cpu_dot8.cpp, cpu_gemm8.cpp, cpu_panel16.cpp, cpu_step.cpp,
    cpu_step_hooks.cpp, cpu_logits.cpp) into one library for this CPU (once: cached by the sources, their headers,
    the compiler and the CPU flags); the library's path.
    `march` other than "native" builds another path for tests (e.g. "haswell": AVX2, "x86-64": portable).
    Raises RuntimeError with the compiler's message when it cannot be built."""
    flags = ["-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    return build_library("cpu_quant", _SOURCES, flags, cache_dir, headers=_HEADERS)


def load_native(cache_dir: Path, march: str = "native") -> tuple[NativeKernels | None, str]:
    """The compiled kernels and "" or None and why not (the caller falls back to the torch reference)."""
    try:
        return NativeKernels(build_native(cache_dir, march)), ""
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
