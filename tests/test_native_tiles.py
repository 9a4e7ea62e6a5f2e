"""The native step's attention in tiles (`disagg_kernels/cpu_step_attention.h`, `attend_tile`: AVX-512) against
the same queries served one at a time (`attend_keys`): the same bits, for every head size the tiles take and either
cache, with each query over its own number of keys (a prompt chunk's causal queries, decode rows, 16-key blocks
and their tails).  What lets a token's attention be the same whatever its step holds, and the same as before the
tiles."""

import ctypes

import pytest
import torch
from native_kernels import FLAGS, native_for

from disagg.engine.kv_format import KVFormat
from disagg.modes import KVDtype


@pytest.mark.parametrize("kv_int8", [False, True])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_tiles_give_each_query_the_bits_it_gets_alone(head_dim, kv_int8, kernel_builds):
    if " avx512f" not in FLAGS:
        pytest.skip("the tiles are built with AVX-512 only")
    native = native_for(kernel_builds)
    lib, ptr, i64 = native.library, ctypes.c_void_p, ctypes.c_int64
    lib.disagg_attend.argtypes = [ctypes.c_int, ctypes.c_int, ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_float, ptr]
    g = torch.Generator().manual_seed(head_dim)
    n, nq = 333, 53  # 53 queries: 3 tiles, the last of 5; groups of 8, 6 or 3 with a remainder
    q = torch.randn(nq, head_dim, generator=g) * 2
    k, v = torch.randn(n, head_dim, generator=g), torch.randn(n, head_dim, generator=g)
    if kv_int8:
        fmt = KVFormat(KVDtype.INT8, head_dim=head_dim, compute=torch.float32)
        k, v = fmt.encode(k).contiguous(), fmt.encode(v).contiguous()
    # causal-like runs of consecutive positions, block edges, a lone key, every key
    seen = torch.tensor([1, 15, 16, 17, 32, n] + list(range(300, 333)) + list(range(40, 54)), dtype=torch.int64)
    outputs = []
    for tiled in (1, 0):
        out = torch.full((nq, head_dim), float("nan"))
        args = (q.data_ptr(), nq, seen.data_ptr(), k.data_ptr(), v.data_ptr(), n, head_dim, 0.125, out.data_ptr())
        lib.disagg_attend(tiled, int(kv_int8), *args)
        outputs.append(out)
    assert not outputs[0].isnan().any()
    assert torch.equal(outputs[0], outputs[1])
