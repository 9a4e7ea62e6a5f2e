"""Attention metadata for one engine step, and the backends that consume it.

The runner builds one `AttentionMetadata` per step (shared by every layer).  The backend is chosen once at
start-up from the device: the torch reference path on CPU, the Triton kernels on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kernels.paged_attention import paged_decode_attention_ref, paged_decode_attention_triton
from kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: tokens in cache after this step, per sequence
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens_list: list[int]
    query_start_list: list[int]
    max_query_len: int
    block_size: int

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    def write_kv(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None: ...

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor: ...


class TorchAttentionBackend:
    """Reference path (CPU): vectorised gather for decode-only steps, per-sequence SDPA otherwise."""

    def write_kv(self, k_cache, v_cache, k, v, meta):
        blocks = meta.slot_mapping // meta.block_size
        offsets = meta.slot_mapping % meta.block_size
        k_cache[blocks, offsets] = k
        v_cache[blocks, offsets] = v

    def attend(self, q, k_cache, v_cache, meta, scale):
        if meta.decode_only:
            return paged_decode_attention_ref(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        return prefill_attention_ref(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_list, meta.seq_lens_list, scale
        )


class TritonAttentionBackend(TorchAttentionBackend):
    """GPU path: Triton paged-decode and prefix-prefill kernels (KV writes stay a scatter)."""

    def attend(self, q, k_cache, v_cache, meta, scale):
        if meta.decode_only:
            return paged_decode_attention_triton(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        return prefill_attention_triton(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale, meta.max_query_len
        )


def select_backend(device: torch.device) -> AttentionBackend:
    return TritonAttentionBackend() if device.type == "cuda" else TorchAttentionBackend()
