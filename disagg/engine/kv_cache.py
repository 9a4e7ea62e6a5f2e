"""The device KV cache: one tensor [blocks, layers, 2, block_size, kv_heads, width].

Block-major so that one block - K and V of every layer - is one contiguous region: the unit a transfer
descriptor or an offload copy moves (one descriptor per block instead of one per layer and block, which measured
2-4x faster over NIXL for scattered blocks; see docs/benchmarks.md).  Layer i is the strided view `tensor[:, i]`.
`width` and the element type are the KV format's (disagg/engine/kv_format.py): head_dim floats, or head_dim
quantized bytes and their scale.
"""

from __future__ import annotations

import torch

from disagg.engine.kv_format import KVFormat
from disagg.engine.model import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, fmt: KVFormat) -> int:
    return block_size * fmt.bytes_per_token(cfg.num_layers, cfg.num_kv_heads)


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, fmt: KVFormat, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.format = fmt
        self.tensor = torch.zeros(
            num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads, fmt.width, dtype=fmt.storage, device=device
        )

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
