"""The device KV cache: one tensor [layers, blocks, 2, block_size, kv_heads, head_dim].

Layout chosen so that one (layer, block) pair - its K and V together - is one contiguous region: the unit a
transfer descriptor or an offload copy moves.
"""
from __future__ import annotations

import torch

from disagg.engine.model import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tensor = torch.zeros(cfg.num_layers, num_blocks, 2, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def block_region(self, layer: int, block_id: int) -> tuple[int, int]:
        """(address, length) of one (layer, block): the descriptor a KV transport registers."""
        view = self.tensor[layer, block_id]
        return view.data_ptr(), view.numel() * view.element_size()
