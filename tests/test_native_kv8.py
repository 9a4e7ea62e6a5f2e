"""The native step over an int8 KV cache (`--kv-dtype int8`; `disagg_kernels/cpu_kv8.h`, `cpu_step.cpp`).

- The step's codec writes and reads engine/kv_format.py's int8 format byte for byte - its float16 scales rounded
  to nearest even, subnormal scales, ties, an all-zero head, a NaN kept as NaN - on every CPU path this machine
  can run (the half conversions are portable code).
- The step over an int8 cache equals its torch reference with every K/V row rounded as the cache rounds it.
- A quantized engine with an int8 cache takes the step at every width (a prompt chunk too), and gives the torch
  path's tokens; a float32 model or an fp8 cache keeps the torch path.
"""

import ctypes
import dataclasses

import pytest
import torch
from test_engine_correctness import assert_same_answers
from native_kernels import native_for
from test_native_step import SHAPE, STEPS, _engine, _stack

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.kv_format import KVFormat
from disagg.modes import KVDtype
from disagg.protocol import SamplingParams
from disagg_kernels.cpu_quant import NativeKernels
from disagg_kernels.cpu_step import StackKernel, forward_reference

D = SHAPE.head_dim
FMT = KVFormat(KVDtype.INT8, head_dim=D, compute=torch.float32)


def _codec(native: NativeKernels):
    lib, ptr, i64 = native.library, ctypes.c_void_p, ctypes.c_int64
    lib.disagg_kv8_encode.argtypes = [ptr, i64, i64, ptr]
    lib.disagg_kv8_decode.argtypes = [ptr, i64, i64, ptr]

    def encode(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty(x.shape[0], D + 2, dtype=torch.uint8)
        lib.disagg_kv8_encode(x.data_ptr(), x.shape[0], D, out.data_ptr())
        return out

    def decode(packed: torch.Tensor) -> torch.Tensor:
        packed = packed.contiguous()
        out = torch.empty(packed.shape[0], D, dtype=torch.float32)
        lib.disagg_kv8_decode(packed.data_ptr(), packed.shape[0], D, out.data_ptr())
        return out

    return encode, decode


def _rounded(rows: torch.Tensor) -> torch.Tensor:
    return FMT.decode(FMT.encode(rows))


def _hard_rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(D, generator=g) * scale for scale in (1e-30, 1e-9, 1e-6, 1e-3, 1.0, 30.0, 1e4, 1e6)]
    rows += [torch.randn(D, generator=g) * torch.exp(torch.randn(D, generator=g) * 3) for _ in range(400)]
    rows.append(torch.zeros(D))  # scale clamped to float16's smallest subnormal
    rows.append(torch.full((D,), -0.0))
    for power in (-20, -3, 0, 5):  # exact ties: x / scale = k + 0.5, rounded to the even k
        s = 2.0**power
        tie = torch.tensor([127.0] + [k + 0.5 for k in range(-7, 8)] + [-127.0] * (D - 16)) * s
        rows.append(tie)
    # scales that fall between float16 values, including its subnormal range (amax / 127 < 2**-14)
    for amax in torch.linspace(1e-7, 3e-3, 40).tolist() + torch.linspace(1.0, 2.0, 40).tolist():
        rows.append(torch.cat((torch.tensor([amax]), torch.rand(D - 1, generator=g) * amax)))
    return torch.stack(rows)


@pytest.mark.parametrize("march", ["native", "haswell", "x86-64"])
def test_the_codec_writes_and_reads_kv_formats_bytes(march, kernel_builds):
    encode, decode = _codec(native_for(kernel_builds, march))
    x = _hard_rows()
    packed = encode(x)
    assert torch.equal(packed, FMT.encode(x))
    assert torch.equal(decode(packed), FMT.decode(packed))
    # any bytes decode as KVFormat decodes them: every int8 code, any float16 scale (NaN and inf included)
    noise = torch.randint(0, 256, (2000, D + 2), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    torch.testing.assert_close(decode(noise), FMT.decode(noise), rtol=0, atol=0, equal_nan=True)
    # a NaN is not rounded away: the head's scale is NaN, so everything read from it is
    poisoned = x[:1].clone()
    poisoned[0, 3] = float("nan")
    assert decode(encode(poisoned)).isnan().all()


@pytest.mark.parametrize("bits", [0, 16])
@pytest.mark.parametrize("march", ["native", "haswell", "x86-64"])  # rows converted as loaded: AVX-512, AVX2, scalar
def test_the_step_over_an_int8_cache_equals_its_reference(march, bits, kernel_builds):
    """The STEPS of test_native_step.py (a prefill chunk, a second sequence sharing a block, decode rows, a
    proposal) over an int8 cache, against the reference over a float32 cache whose rows are rounded as int8 rounds
    them."""
    native = native_for(kernel_builds, march)
    layers, inv_freq, final_norm = _stack(0)
    shape = dataclasses.replace(SHAPE, activation_bits=bits)
    kv8 = torch.zeros(10, len(layers), 2, SHAPE.block_size, SHAPE.kv_heads, D + 2, dtype=torch.uint8)
    reference = torch.zeros(10, len(layers), 2, SHAPE.block_size, SHAPE.kv_heads, D)
    kernel = StackKernel(native, shape, layers, inv_freq, final_norm, kv8, kv_int8=True)
    tables = torch.tensor([[3, 5, 7, 0], [3, 2, 0, 0]], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    for positions, rows in STEPS:
        if rows[0] == 1 and positions[0] == 0:
            tables[1, 0] = 6
        hidden = torch.randn(len(positions), SHAPE.hidden, generator=g)
        args = (torch.tensor(positions), tables, torch.tensor(rows))
        got = kernel.forward(hidden.clone(), *args)
        want = forward_reference(
            shape, layers, inv_freq, final_norm, reference, hidden.clone(), *args, kv_round=_rounded
        )
        # a flipped code is one int8 step (max|x| / 127 of its head): that, through the 4 layers, bounds the rest
        written = FMT.decode(kv8.view(-1, D + 2)).view(reference.shape)
        flipped = (written != reference).float().mean().item()
        # float32 activations: float error alone, which crosses an int8 boundary almost never (none here); int16:
        # float error moves an activation across an int16 rounding boundary now and then, and that larger step
        # crosses an int8 one more often (0.2-2.3% of the values on this machine's three paths)
        assert flipped < {0: 1e-3, 16: 0.05}[bits], f"{flipped:.2%} of the cached values differ"
        torch.testing.assert_close(written, reference, atol=0.05, rtol=1e-4)
        torch.testing.assert_close(got, want, atol={0: 2e-5, 16: 0.02}[bits], rtol=1e-4)
        assert (got - want).abs().mean() < {0: 2e-6, 16: 5e-3}[bits]  # int16: a quarter of the max bound


def test_a_quantized_engine_with_an_int8_cache_takes_the_step_at_every_width(tiny_qwen_dir, tiny_llama_dir):
    native = _engine(tiny_qwen_dir, True, kv_dtype="int8")
    torch_path = _engine(tiny_qwen_dir, False, kv_dtype="int8")
    step = native.runner.native_step
    assert step is not None and native.runner.kernel_path.endswith("+stack")
    calls = {"native": 0}
    forward = step.forward

    def counted(*args):
        calls["native"] += 1
        return forward(*args)

    step.forward = counted
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [list(range(3, 3 + n)) for n in (1, 5, 80, 7)]  # 93 prompt tokens: one step wider than direct_rows
    assert_same_answers((native, torch_path), prompts, greedy, bound=2e-2)
    assert calls["native"] == greedy.max_tokens  # the prefill too: every step of the engine
    # where the step does not serve an encoded cache: a float32 model (its wide steps), an fp8 cache
    assert _engine(tiny_llama_dir, True, kv_dtype="fp8").runner.native_step is None
    plain = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, kv_dtype="int8"))
    assert plain.runner.native_step is None and plain.runner.kernel_path == "float"


def test_an_int8_cache_over_long_prefixes_equals_the_reference(kernel_builds):
    """Long prefixes take attention's 16-keys-at-a-time path, its prefetches and its threads: two sequences of 600
    and 40 slots written by the kernel, then a decode row of each and a 5-token proposal of the long one."""
    native = native_for(kernel_builds)
    layers, inv_freq, final_norm = _stack(2)
    shape = dataclasses.replace(SHAPE, block_size=16)
    kv8 = torch.zeros(48, len(layers), 2, 16, SHAPE.kv_heads, D + 2, dtype=torch.uint8)
    kernel = StackKernel(native, shape, layers, inv_freq, final_norm, kv8, kv_int8=True)
    tables = torch.tensor([list(range(1, 41)), list(range(41, 44)) + [0] * 37], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    for start in range(0, 600, 64):
        positions = list(range(start, min(start + 64, 600))) + ([] if start else list(range(40)))
        rows = [0] * min(64, 600 - start) + ([] if start else [1] * 40)
        hidden = torch.randn(len(positions), SHAPE.hidden, generator=g)
        kernel.forward(hidden, torch.tensor(positions), tables, torch.tensor(rows))
    reference = FMT.decode(kv8.view(-1, D + 2)).view(*kv8.shape[:-1], D)  # what the kernel wrote, de-quantized
    positions, rows = [600, 40, 601, 602, 603, 604, 605], [0, 1, 0, 0, 0, 0, 0]
    hidden = torch.randn(len(positions), SHAPE.hidden, generator=g)
    args = (torch.tensor(positions), tables, torch.tensor(rows))
    got = kernel.forward(hidden.clone(), *args)
    want = forward_reference(shape, layers, inv_freq, final_norm, reference, hidden.clone(), *args, kv_round=_rounded)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)  # float32 activations: float error only
    written = FMT.decode(kv8.view(-1, D + 2)).view(reference.shape)
    assert (written != reference).float().mean().item() < 1e-3


@pytest.mark.parametrize("kv_int8", [False, True])
@pytest.mark.parametrize("march", ["native", "haswell", "x86-64"])
def test_a_prompt_in_chunks_and_token_by_token_gives_the_same_bits(march, kv_int8, kernel_builds):
    """Each token's output has the same bits whether its prompt runs in 64-token chunks (up to 16 queries to a
    tile of cpu_step_attention.h, the walks split among the threads) or a token a step (a tile of one token's
    query heads), two sequences of 300 slots side by side, over either cache: the batch invariance an int8 cache
    promises."""
    native = native_for(kernel_builds, march)
    layers, inv_freq, final_norm = _stack(4)
    shape = dataclasses.replace(SHAPE, block_size=16)
    width, dtype = (D + 2, torch.uint8) if kv_int8 else (D, torch.float32)
    tables = torch.tensor([list(range(1, 21)) + [0, 0], list(range(21, 43))], dtype=torch.int32)
    n = 300
    hidden = torch.randn(2, n, SHAPE.hidden, generator=torch.Generator().manual_seed(5))
    outputs = []
    for chunk in (64, 1):
        kv = torch.zeros(44, len(layers), 2, 16, SHAPE.kv_heads, width, dtype=dtype)
        kernel = StackKernel(native, shape, layers, inv_freq, final_norm, kv, kv_int8=kv_int8)
        out = torch.empty(2, n, SHAPE.hidden)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            args = (
                torch.tensor(list(range(start, end)) * 2),
                tables,
                torch.tensor([0, 1]).repeat_interleave(end - start),
            )
            y = kernel.forward(torch.cat([hidden[0, start:end], hidden[1, start:end]]), *args)
            out[0, start:end], out[1, start:end] = y[: end - start], y[end - start :]
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])
