"""The KV cache's element format: `--kv-dtype auto | float32 | bfloat16 | int8 | fp8`, chosen once at start-up.

A float format stores K and V as they are computed (auto: the model's dtype) or cast to a narrower float.  The
quantized formats store, for every token and KV head, `head_dim` one-byte values and their scale (float16, two
bytes) side by side in the last dimension, so the cache stays one uint8 tensor [blocks, layers, 2, block_size,
kv_heads, head_dim + 2]: a block is still one contiguous region, and everything that moves blocks by bytes - the
NIXL transfer, the CPU and disk tiers, their checksums - moves the narrower blocks unchanged, and fewer bytes.

  int8: symmetric, scale = max|x| / 127 over the token's head, values rounded to nearest (vLLM's per-token int8
        KV; llama.cpp's q8_0 cache is the same idea per 32 values).
  fp8:  float8 e4m3 with scale = max|x| / 448 (its largest finite value), so every token uses the full range.

Per-token scales are computed as the token is written and never change, so prefix-cache hits, imports and
speculative verification see the same bytes as the step that wrote them.  Attention de-quantizes only the blocks
a step reads (`AttentionMetadata.gather_ids`) and runs the float kernels on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from disagg.modes import KVDtype

SCALE_BYTES = 2  # a float16 scale per token and KV head
_QMAX = {"int8": 127.0, "fp8": 448.0}  # largest magnitude each format represents (float8 e4m3: 448)
_MIN_SCALE = 2.0**-24  # float16's smallest subnormal: an all-zero head still gets a finite, non-zero scale
_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class KVFormat:
    """How K and V of one token and head are stored: `width` elements of `storage` in the cache's last dim."""

    kind: KVDtype
    head_dim: int
    compute: torch.dtype  # what attention reads (the model's dtype)

    @property
    def storage(self) -> torch.dtype:
        if self.kind.quantized:
            return torch.uint8
        return self.compute if self.kind is KVDtype.AUTO else _FLOATS[self.kind.value]

    @property
    def width(self) -> int:
        return self.head_dim + SCALE_BYTES if self.kind.quantized else self.head_dim

    @property
    def encoded(self) -> bool:
        """True when the cache does not hold the compute dtype: writes encode, reads decode."""
        return self.storage != self.compute

    @property
    def name(self) -> str:
        """The resolved format (auto named by its dtype): what the engine fingerprint carries."""
        return self.kind.value if self.kind is not KVDtype.AUTO else str(self.compute).removeprefix("torch.")

    def bytes_per_token(self, num_layers: int, num_kv_heads: int) -> int:
        return num_layers * 2 * num_kv_heads * self.width * torch.empty((), dtype=self.storage).element_size()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., head_dim] in the compute dtype -> [..., width] in the storage dtype."""
        if not self.kind.quantized:
            return x.to(self.storage)
        xf = x.float()
        qmax = _QMAX[self.kind.value]
        scale = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(_MIN_SCALE).half()
        scaled = xf / scale.float()
        if self.kind is KVDtype.INT8:
            values = scaled.round_().clamp_(-qmax, qmax).to(torch.int8).view(torch.uint8)
        else:
            values = scaled.clamp_(-qmax, qmax).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat((values, scale.view(torch.uint8)), dim=-1)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """[..., width] in the storage dtype -> [..., head_dim] in the compute dtype."""
        if not self.kind.quantized:
            return packed.to(self.compute)
        packed = packed.contiguous()
        raw = packed[..., : self.head_dim]
        values = raw.view(torch.int8) if self.kind is KVDtype.INT8 else raw.view(torch.float8_e4m3fn)
        scale = packed[..., self.head_dim :].view(torch.float16)
        return (values.float() * scale.float()).to(self.compute)
