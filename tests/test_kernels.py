"""Triton kernels vs torch references (interpreter mode on CPU, set in conftest), small shapes."""
import pytest
import torch

from disagg_kernels.paged_attention import paged_decode_attention_ref, paged_decode_attention_triton
from disagg_kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton


def _paged_cache(num_blocks, block_size, kv_heads, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim, generator=g)
    return cache[:, 0], cache[:, 1]  # strided views, as the engine passes them


def _naive_attention(q_rows, keys, values, q_positions, scale):
    """Plain loop-free dense attention for one sequence, the textbook way (fp64)."""
    heads, kv_heads = q_rows.shape[1], keys.shape[1]
    k = keys.double().repeat_interleave(heads // kv_heads, dim=1)
    v = values.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q_rows.double(), k) * scale
    mask = torch.arange(keys.shape[0])[None, :] > q_positions[:, None]
    scores = scores.masked_fill(mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim", [(16, 4, 2, 32), (8, 4, 4, 16), (16, 6, 2, 24)])
def test_paged_decode_kernel_matches_reference(block_size, heads, kv_heads, head_dim):
    k_cache, v_cache = _paged_cache(20, block_size, kv_heads, head_dim, seed=0)
    seq_lens = torch.tensor([1, block_size, 3 * block_size + 5, 37], dtype=torch.int32)
    tables = torch.randperm(20, generator=torch.Generator().manual_seed(1)).view(4, 5).int()
    q = torch.randn(4, heads, head_dim)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.3)
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, seq_lens, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and the reference against textbook attention on the gathered sequence
    for i, n in enumerate(seq_lens.tolist()):
        keys = k_cache[tables[i].long()].reshape(-1, kv_heads, head_dim)[:n]
        values = v_cache[tables[i].long()].reshape(-1, kv_heads, head_dim)[:n]
        naive = _naive_attention(q[i:i + 1], keys, values, torch.tensor([n - 1]), 0.3)
        torch.testing.assert_close(ref[i:i + 1], naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim", [(16, 4, 2, 32), (8, 2, 1, 16), (16, 6, 3, 24)])
def test_prefill_kernel_with_cached_prefix_matches_reference(block_size, heads, kv_heads, head_dim):
    k_cache, v_cache = _paged_cache(24, block_size, kv_heads, head_dim, seed=2)
    # (query tokens, total tokens): full prefill, prefix hit, chunk, decode-like, unaligned
    shapes = [(20, 20), (5, 3 * block_size + 5), (block_size, 4 * block_size), (1, 9), (7, 30)]
    q_start = [0]
    for q_len, _ in shapes:
        q_start.append(q_start[-1] + q_len)
    seq_lens = [n for _, n in shapes]
    tables = torch.randperm(24, generator=torch.Generator().manual_seed(3))[:20].view(5, 4).int()
    q = torch.randn(q_start[-1], heads, head_dim)
    ref = prefill_attention_ref(q, k_cache, v_cache, tables, q_start, seq_lens, 0.25)
    out = prefill_attention_triton(q, k_cache, v_cache, tables, torch.tensor(q_start, dtype=torch.int32),
                                   torch.tensor(seq_lens, dtype=torch.int32), 0.25,
                                   max_query_len=max(s[0] for s in shapes))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for i, (q_len, n) in enumerate(shapes):
        keys = k_cache[tables[i].long()].reshape(-1, kv_heads, head_dim)[:n]
        values = v_cache[tables[i].long()].reshape(-1, kv_heads, head_dim)[:n]
        positions = torch.arange(n - q_len, n)
        naive = _naive_attention(q[q_start[i]:q_start[i + 1]], keys, values, positions, 0.25)
        torch.testing.assert_close(ref[q_start[i]:q_start[i + 1]], naive, atol=1e-5, rtol=1e-5)
