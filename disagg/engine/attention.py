"""Attention metadata for one engine step, and the backends that consume it.

The runner builds one `AttentionMetadata` per step (shared by every layer).  The backend is chosen once at
start-up from the device: the torch reference path on CPU, the Triton kernels on CUDA; a cache in another format
than the compute dtype (`--kv-dtype`) wraps it in an `EncodedKVBackend`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from disagg.engine.kv_format import KVFormat
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
    # an encoded cache (EncodedKVBackend): the blocks this step reads, and block_tables indexing into that list
    gather_ids: torch.Tensor | None = None
    compact_tables: torch.Tensor | None = None
    verify_rows: frozenset[int] = frozenset()  # batch rows whose query tokens verify a proposal

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


def compact_tables(tables: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For an encoded cache: the blocks a step reads (each once, ascending) and the sequences' block tables
    renumbered into that list, padded with 0 to the longest (`AttentionMetadata.gather_ids`, `compact_tables`)."""
    used = sorted({b for table in tables for b in table})
    index = {b: i for i, b in enumerate(used)}
    width = max(len(table) for table in tables)
    compact = [[index[b] for b in table] + [0] * (width - len(table)) for table in tables]
    return torch.tensor(used, dtype=torch.int64, device=device), torch.tensor(compact, dtype=torch.int32, device=device)


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
        single = [i for i in range(len(starts) - 1) if starts[i + 1] - starts[i] == 1 or i in meta.verify_rows]
        if len(single) < 2 and not meta.verify_rows:  # nothing to batch: one SDPA call per sequence
            return prefill_attention_ref(
                q, k_cache, v_cache, meta.block_tables, meta.query_start_list, meta.seq_lens_list, scale
            )
        return self._mixed(q, k_cache, v_cache, meta, scale, single)

    @staticmethod
    def _mixed(q, k_cache, v_cache, meta, scale, single):
        """A step with decode rows and prefill chunks: the decode rows in one batched call, the chunks each.

        A row verifying a proposal (`meta.verify_rows`) runs as one decode row per position - the kernel, and so
        the bits, that plain decoding uses for each of those tokens: speculation then changes no greedy token even
        where a KV format's rounding would magnify the last-bit differences between two kernels."""
        starts = meta.query_start_list
        out = torch.empty_like(q)
        queries, tables, lens = [], [], []
        for i in single:
            n = starts[i + 1] - starts[i]
            queries.extend(range(starts[i], starts[i + 1]))
            tables.extend([i] * n)
            lens.extend(range(meta.seq_lens_list[i] - n + 1, meta.seq_lens_list[i] + 1))
        rows = torch.tensor(queries, device=q.device)
        out[rows] = paged_decode_attention_sdpa(
            q[rows],
            k_cache,
            v_cache,
            meta.block_tables[torch.tensor(tables, device=q.device)],
            torch.tensor(lens, dtype=torch.int32, device=q.device),
            scale,
        )
        chunks = [i for i in range(len(starts) - 1) if i not in single]
        if not chunks:
            return out
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


class EncodedKVBackend:
    """A cache in a narrower format (bfloat16 under float32 compute, int8 or fp8 with per-token scales): writes
    encode the new tokens' K and V; attention decodes only the blocks the step reads (`meta.gather_ids`, each once
    even when sequences share a prefix) into a compact float cache and runs the inner backend's kernels on it."""

    def __init__(self, inner: AttentionBackend, fmt: KVFormat) -> None:
        self.inner, self.format = inner, fmt

    def write_kv(self, k_cache, v_cache, k, v, meta):
        self.inner.write_kv(k_cache, v_cache, self.format.encode(k), self.format.encode(v), meta)

    def attend(self, q, k_cache, v_cache, meta, scale):
        if meta.gather_ids is None or meta.compact_tables is None:
            raise ValueError("an encoded KV cache needs the step's gather_ids (ModelRunner.prepare builds them)")
        keys = self.format.decode(k_cache[meta.gather_ids])
        values = self.format.decode(v_cache[meta.gather_ids])
        compact = dataclasses.replace(meta, block_tables=meta.compact_tables)
        return self.inner.attend(q, keys, values, compact, scale)


def select_backend(device: torch.device, fmt: KVFormat) -> AttentionBackend:
    inner = TritonAttentionBackend() if device.type == "cuda" else TorchAttentionBackend()
    return EncodedKVBackend(inner, fmt) if fmt.encoded else inner
