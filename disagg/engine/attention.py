"""Attention metadata for one engine step, and the backends that consume it.

The runner builds one `AttentionMetadata` per step (shared by every layer).  The backend is chosen once at
start-up from the device: the torch reference path on CPU, the Triton kernels on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from disagg_kernels.paged_attention import paged_decode_attention_sdpa, paged_decode_attention_triton
from disagg_kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton


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
            return paged_decode_attention_sdpa(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        starts = meta.query_start_list
        single = [i for i in range(len(starts) - 1) if starts[i + 1] - starts[i] == 1]
        if len(single) < 2:  # nothing to batch: one SDPA call per sequence
            return prefill_attention_ref(
                q, k_cache, v_cache, meta.block_tables, meta.query_start_list, meta.seq_lens_list, scale
            )
        return self._mixed(q, k_cache, v_cache, meta, scale, single)

    @staticmethod
    def _mixed(q, k_cache, v_cache, meta, scale, single):
        """A step with decode rows and prefill chunks: the decode rows in one batched call, the chunks each."""
        starts = meta.query_start_list
        out = torch.empty_like(q)
        rows = torch.tensor([starts[i] for i in single], device=q.device)
        picked = torch.tensor(single, device=q.device)
        out[rows] = paged_decode_attention_sdpa(
            q[rows], k_cache, v_cache, meta.block_tables[picked], meta.seq_lens[picked], scale
        )
        chunks = [i for i in range(len(starts) - 1) if starts[i + 1] - starts[i] > 1]
        sub_starts = [0]
        for i in chunks:
            sub_starts.append(sub_starts[-1] + starts[i + 1] - starts[i])
        flat = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in chunks]).to(q.device)
        out[flat] = prefill_attention_ref(
            q[flat],
            k_cache,
            v_cache,
            meta.block_tables[torch.tensor(chunks, device=q.device)],
            sub_starts,
            [meta.seq_lens_list[i] for i in chunks],
            scale,
        )
        return out


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
