"""Causal attention for a batch of query chunks whose earlier tokens may already sit in the paged KV cache.

Each sequence i contributes q_len_i new query tokens (concatenated along dim 0, offsets in `query_start_loc`);
its keys/values - the cached prefix *and* the new tokens, already written - are in the paged cache, `seq_len_i`
tokens long.  Query j of sequence i sits at position seq_len_i - q_len_i + j and attends to keys 0..that position.
This covers plain prefill (no prefix), prefill after a prefix-cache hit, chunked prefill, and decode (q_len 1).

Shapes: q [T, H, D]; k_cache/v_cache [num_blocks, BS, KVH, D]; block_tables [B, max_blocks];
query_start_loc [B + 1]; seq_lens [B].  Returns [T, H, D].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, query_start_loc: list[int], seq_lens: list[int],
                          scale: float) -> torch.Tensor:
    """Torch reference: one SDPA call per sequence on its gathered blocks with an offset causal mask."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    out = torch.empty_like(q)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        num_blocks = (seq_len + block_size - 1) // block_size
        table = block_tables[i, :num_blocks].long()
        keys = k_cache[table].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        values = v_cache[table].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(diagonal=seq_len - q_len)
        attn = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = attn.squeeze(0).transpose(0, 1)
    return out


if triton is not None:

    @triton.jit
    def _prefill_kernel(Q, K, V, O, BT, QSTART, SEQ_LENS, scale,
                        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh, stride_ot, stride_oh, stride_bt,
                        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        tile = tl.program_id(2)
        kv_head = head // GROUP
        q_start = tl.load(QSTART + seq)
        q_len = tl.load(QSTART + seq + 1) - q_start
        seq_len = tl.load(SEQ_LENS + seq)
        context_start = seq_len - q_len

        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_SIZE)
        d = tl.arange(0, HEAD_DIM_P2)
        d_ok = d < HEAD_DIM
        row_ok = offs_m < q_len
        q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q_pos = context_start + offs_m

        m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
        # Tiles past q_len run no iteration; the last key any row of this tile may see bounds the loop.
        kv_end = tl.minimum(seq_len, context_start + (tile + 1) * BLOCK_M)
        kv_end = tl.where(tile * BLOCK_M < q_len, kv_end, 0)
        for i in range(0, tl.cdiv(kv_end, BLOCK_SIZE)):
            block = tl.load(BT + seq * stride_bt + i).to(tl.int64)
            k_pos = i * BLOCK_SIZE + offs_n
            kv_mask = (k_pos < seq_len)[:, None] & d_ok[None, :]
            k = tl.load(K + block * stride_kb + offs_n[:, None] * stride_ks + kv_head * stride_kh + d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(V + block * stride_vb + offs_n[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
            s = tl.where(visible, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty tiles (past q_len) store nothing
        tl.store(O + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                             scale: float, max_query_len: int, block_m: int = 16) -> torch.Tensor:
    """Triton kernel: one program per (sequence, head, tile of block_m queries), online softmax over blocks."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    num_seqs = seq_lens.shape[0]
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, BLOCK_M=block_m, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        HEAD_DIM_P2=triton.next_power_of_2(head_dim),
    )
    return out
