"""The whole decoder stack for a few tokens in one native call (`cpu_step.cpp`), over block-quantized weights.

`StackKernel` holds the ctypes mirror of the stack (every layer's norms and block matrices, the rotary
frequencies, the paged cache's layout) and keeps a reference to each tensor it points into, so the pointers stay
valid for its life.  Weights changed in place (a fault drill's scaling) are seen by the next call; tensors that are
replaced are not, so whoever replaces one builds a new kernel.  `forward_reference` is the same step in torch, one
token at a time, which the tests hold the kernel to.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from disagg_kernels.cpu_quant import BlockWeight, NativeKernels, PanelWeight, matmul_reference

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
KV8_SCALE_BYTES = 2  # an int8 cache's float16 scale per token and head, after its values (cpu_kv8.h)


class _Mat(ctypes.Structure):
    _fields_ = [
        *[(name, _i64) for name in ("codes", "n", "k")],
        *[(name, _ptr) for name in ("qs", "d", "m", "bias", "panels")],
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr),
        ("post_norm", _ptr),
        ("qkv", _Mat),
        ("o", _Mat),
        ("gate_up", _Mat),
        ("down", _Mat),
    ]


class _Stack(ctypes.Structure):
    _fields_ = [
        *[(name, _i64) for name in ("num_layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim")],
        ("block_size", _i64),
        ("activation_bits", _i64),
        ("blocked_rows", _i64),
        ("eps", _f32),
        ("inv_freq", _ptr),
        ("final_norm", _ptr),
        ("layers", ctypes.POINTER(_Layer)),
        ("kv", _ptr),
        *[(name, _i64) for name in ("stride_block", "stride_layer", "stride_kv", "stride_slot", "stride_head")],
        ("kv_int8", _i64),
    ]


@dataclass(frozen=True)
class StackShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    eps: float
    activation_bits: int = 0  # 8 / 16: the matmuls round x to int8 / int16 blocks first (cpu_dot8.cpp)
    blocked_rows: int = 0  # with activation_bits: steps of at least this many tokens use cpu_gemm8.cpp (0: never)


@dataclass
class StackLayer:
    """One decoder layer's weights: float32 norms, block matrices (QKV and gate/up fused; packed panels with int16
    activations, where the panel kernel is built), QKV's optional bias."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: BlockWeight | PanelWeight
    o: BlockWeight | PanelWeight
    gate_up: BlockWeight | PanelWeight
    down: BlockWeight | PanelWeight
    qkv_bias: torch.Tensor | None = None


def _float_ptr(t: torch.Tensor | None, keep: list[torch.Tensor]) -> int | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"the native step reads contiguous float32 CPU tensors, got {t.dtype} on {t.device}")
    keep.append(t)
    return t.data_ptr()


def _mat(w: BlockWeight | PanelWeight, bias: torch.Tensor | None, keep: list[torch.Tensor]) -> _Mat:
    n, k = w.shape
    if isinstance(w, PanelWeight):
        keep.append(w.data)
        return _Mat(w.fmt.codes, n, k, None, None, None, _float_ptr(bias, keep), w.data.data_ptr())
    for t in (w.qs, w.d, w.m):
        if t is not None and not t.is_contiguous():
            raise ValueError("the native step reads contiguous block matrices")
    keep.append(w.qs)
    d, m, b = _float_ptr(w.d, keep), _float_ptr(w.m, keep), _float_ptr(bias, keep)
    return _Mat(w.fmt.codes, n, k, w.qs.data_ptr(), d, m, b, None)


class StackKernel:
    """See the module docstring.  `kv`: the engine's cache [blocks, layers, 2, block_size, kv_heads, width]:
    float32 (width D), or with `kv_int8` uint8 holding engine/kv_format.py's int8 format (width D + 2: a token's
    head as D int8 values and a float16 scale; cpu_kv8.h writes and reads it with KVFormat's bits)."""

    def __init__(
        self,
        native: NativeKernels,
        shape: StackShape,
        layers: list[StackLayer],
        inv_freq: torch.Tensor,
        final_norm: torch.Tensor,
        kv: torch.Tensor,
        *,
        kv_int8: bool = False,
    ) -> None:
        dtype, width = (torch.uint8, shape.head_dim + KV8_SCALE_BYTES) if kv_int8 else (torch.float32, shape.head_dim)
        if kv.dtype != dtype or kv.dim() != 6 or kv.shape[-1] != width or kv.stride(-1) != 1:
            raise ValueError(
                f"the native step writes a {dtype} cache [blocks, layers, 2, block_size, kv_heads, {width}]"
            )
        mats = [m for x in layers for m in (x.qkv, x.o, x.gate_up, x.down)]
        if shape.activation_bits != 16 and any(isinstance(m, PanelWeight) for m in mats):
            raise ValueError("packed panels are read with int16 activations only (activation_bits=16)")
        self.native = native  # the kernels it calls (the runner's logit scan calls the same, none loaded for it)
        self._keep: list[torch.Tensor] = [kv]
        keep = self._keep
        self._layers = (_Layer * len(layers))(
            *[
                _Layer(
                    _float_ptr(x.input_norm, keep),
                    _float_ptr(x.post_norm, keep),
                    _mat(x.qkv, x.qkv_bias, keep),
                    _mat(x.o, None, keep),
                    _mat(x.gate_up, None, keep),
                    _mat(x.down, None, keep),
                )
                for x in layers
            ]
        )
        s = shape
        strides = kv.stride()
        self._stack = _Stack(
            len(layers), s.hidden, s.intermediate, s.heads, s.kv_heads, s.head_dim, s.block_size,
            s.activation_bits, s.blocked_rows, s.eps,
            _float_ptr(inv_freq.contiguous(), keep), _float_ptr(final_norm, keep),
            self._layers, kv.data_ptr(), strides[0], strides[1], strides[2], strides[3], strides[4], int(kv_int8),
        )  # fmt: skip
        self.shape = shape
        fn = native.library.disagg_stack_forward
        fn.argtypes = [ctypes.POINTER(_Stack), _ptr, _i64, _ptr, _ptr, _i64, _ptr, ctypes.c_int]
        fn.restype = None
        self._fn = fn
        with_logits = native.library.disagg_stack_logits
        with_logits.argtypes = [*fn.argtypes, ctypes.POINTER(_Mat), _ptr, _i64, _ptr, _ptr, _ptr]
        with_logits.restype = None
        self._with_logits = with_logits
        self._head: _Mat | None = None

    def set_head(self, head: PanelWeight, bias: torch.Tensor | None = None) -> None:
        """The LM head `forward_logits` ends with: a matrix packed into panels (int16 activations, the product
        QuantLinear computes with it) and its optional float32 bias."""
        if not isinstance(head, PanelWeight) or head.shape[1] != self.shape.hidden:
            raise ValueError(f"the step's head is a panel matrix [vocab, {self.shape.hidden}]")
        self._head = _mat(head, bias, self._keep)

    @property
    def has_head(self) -> bool:
        return self._head is not None

    def _inputs(
        self, hidden: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = hidden.shape[0]
        if hidden.dtype != torch.float32 or not hidden.is_contiguous() or hidden.shape[1] != self.shape.hidden:
            raise ValueError(f"hidden must be contiguous float32 [T, {self.shape.hidden}]")
        positions = positions.to(torch.int64).contiguous()
        tables = tables.to(torch.int32).contiguous()
        rows = rows.to(torch.int64).contiguous()
        if positions.numel() != t or rows.numel() != t:
            raise ValueError("one position and one table row per token")
        return positions, tables, rows

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, hidden] float32 (the embeddings; overwritten with the final-normed states and returned);
        positions [T] int64; tables [R, W] int32 block ids; rows [T] int64: each token's row of `tables`."""
        positions, tables, rows = self._inputs(hidden, positions, tables, rows)
        self._fn(
            ctypes.byref(self._stack), hidden.data_ptr(), hidden.shape[0], positions.data_ptr(), tables.data_ptr(),
            tables.shape[1], rows.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return hidden

    def forward_logits(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        rows: torch.Tensor,
        pick: list[int],
    ) -> tuple[torch.Tensor, list[int], list[bool]]:
        """`forward`, then the head (`set_head`) over the final-normed states of tokens `pick`: their logits
        [len(pick), vocab] float32, and per row its first maximum and whether it is finite (`scan_logits`'s)."""
        if self._head is None:
            raise ValueError("forward_logits needs the LM head (set_head)")
        positions, tables, rows = self._inputs(hidden, positions, tables, rows)
        chosen = torch.tensor(pick, dtype=torch.int64)
        if chosen.numel() and not 0 <= int(chosen.min()) <= int(chosen.max()) < hidden.shape[0]:
            raise ValueError(f"rows to pick lie in [0, {hidden.shape[0]})")
        p = chosen.numel()
        logits = torch.empty(p, self._head.n, dtype=torch.float32)
        argmax = torch.empty(p, dtype=torch.int64)
        finite = torch.empty(p, dtype=torch.uint8)
        self._with_logits(
            ctypes.byref(self._stack), hidden.data_ptr(), hidden.shape[0], positions.data_ptr(), tables.data_ptr(),
            tables.shape[1], rows.data_ptr(), torch.get_num_threads(), ctypes.byref(self._head), chosen.data_ptr(),
            p, logits.data_ptr(), argmax.data_ptr(), finite.data_ptr(),
        )  # fmt: skip
        return logits, argmax.tolist(), [bool(f) for f in finite.tolist()]


def forward_reference(
    shape: StackShape,
    layers: list[StackLayer],
    inv_freq: torch.Tensor,
    final_norm: torch.Tensor,
    kv: torch.Tensor,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    tables: torch.Tensor,
    rows: torch.Tensor,
    kv_round: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The kernel's step in torch (tests): tokens one after another, each writing its K/V before it attends.
    `kv` is float32; `kv_round` maps each K and V row to what a narrower cache gives back (an int8 cache's
    encode then decode)."""
    s, d, bs, i8 = shape, shape.head_dim, shape.block_size, shape.activation_bits
    out = []
    for t in range(hidden.shape[0]):
        x, pos, table = hidden[t : t + 1].clone(), int(positions[t]), tables[int(rows[t])]
        freqs = float(pos) * inv_freq
        cos, sin = torch.cat((freqs, freqs)).cos(), torch.cat((freqs, freqs)).sin()
        for i, layer in enumerate(layers):
            h = F.rms_norm(x, (s.hidden,), layer.input_norm, s.eps)
            qkv = matmul_reference(h, layer.qkv, i8)[0] + (0 if layer.qkv_bias is None else layer.qkv_bias)
            qk = qkv[: (s.heads + s.kv_heads) * d].view(-1, d)
            qk = qk * cos + torch.cat((-qk[:, d // 2 :], qk[:, : d // 2]), -1) * sin
            q, k = qk[: s.heads], qk[s.heads :]
            v = qkv[(s.heads + s.kv_heads) * d :].view(-1, d)
            if kv_round is not None:
                k, v = kv_round(k), kv_round(v)
            kv[int(table[pos // bs]), i, 0, pos % bs] = k
            kv[int(table[pos // bs]), i, 1, pos % bs] = v
            slots = [(int(table[j // bs]), j % bs) for j in range(pos + 1)]
            keys = torch.stack([kv[b, i, 0, o] for b, o in slots], 1)  # [kv_heads, len, d]
            values = torch.stack([kv[b, i, 1, o] for b, o in slots], 1)
            group = s.heads // s.kv_heads
            probs = torch.softmax(q.view(s.kv_heads, group, d) @ keys.transpose(1, 2) / math.sqrt(d), -1)
            x = x + matmul_reference((probs @ values).reshape(1, -1), layer.o, i8)
            h = F.rms_norm(x, (s.hidden,), layer.post_norm, s.eps)
            gate, up = matmul_reference(h, layer.gate_up, i8).chunk(2, -1)
            x = x + matmul_reference(F.silu(gate) * up, layer.down, i8)
        out.append(F.rms_norm(x, (s.hidden,), final_norm, s.eps))
    return torch.cat(out)
