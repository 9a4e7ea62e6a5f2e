"""The native step (`disagg_kernels/cpu_step.cpp`, `disagg/engine/native_step.py`): a CPU model's small steps
(quantized or float32 weights) run the whole decoder stack in one C++ call.

- The kernel equals its torch reference on every CPU path this machine can run (AVX-512, AVX2, portable), with
  float32 activations and with activations rounded to int16 or int8 blocks (`--quant-activations`): every block
  format, a QKV bias, a prefill chunk, decode rows, a proposal's tokens, sequences sharing a prefix block.
- An engine that takes it gives the tokens and, within float summation error, the logits of the torch path, on a
  model with a QKV bias (Qwen2), for decode batches, short prefill chunks and long prompts (the torch path's).
- Which steps and which engines take it: not LoRA rows, not steps wider than `direct_rows` (but every width over
  an int8 KV cache: test_native_kv8.py), not an fp8 cache, not bfloat16 compute; float32 weights do (their
  matrices read in place as F32 blocks).
"""

import dataclasses

import pytest
import torch
from native_kernels import native_for
from test_engine_correctness import assert_same_answers

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.quant import QuantConfig
from disagg.engine.sequence import Sequence
from disagg.protocol import LoRARef, SamplingParams
from disagg_kernels import native_build
from disagg_kernels.cpu_quant import BlockFormat, load_native, quantize
from disagg_kernels.cpu_step import StackKernel, StackLayer, StackShape, forward_reference

SHAPE = StackShape(hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, block_size=4, eps=1e-5)


def _stack(seed: int) -> tuple[list[StackLayer], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def blocks(n, k, fmt):
        return quantize(torch.randn(n, k, generator=g) * 0.2, fmt)

    formats = list(BlockFormat)
    layers = [
        StackLayer(
            input_norm=torch.rand(64, generator=g) + 0.5,
            post_norm=torch.rand(64, generator=g) + 0.5,
            qkv=blocks(8 * 16, 64, formats[i % len(formats)]),
            o=blocks(64, 64, formats[(i + 1) % len(formats)]),
            gate_up=blocks(192, 64, formats[(i + 2) % len(formats)]),
            down=blocks(64, 96, formats[(i + 3) % len(formats)]),
            qkv_bias=torch.randn(128, generator=g) if i % 2 == 0 else None,
        )
        for i in range(4)
    ]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    return layers, inv_freq, torch.rand(64, generator=g) + 0.5


# (positions, each token's table row): a 6-token prefill chunk; a second sequence's 3; one decode row each; a
# 3-token proposal under verification beside a decode row
STEPS = [([0, 1, 2, 3, 4, 5], [0] * 6), ([0, 1, 2], [1, 1, 1]), ([6, 3], [0, 1]), ([7, 8, 9, 4], [0, 0, 0, 1])]


@pytest.mark.parametrize(
    ("bits", "blocked_rows", "panels"),
    # float32 activations, then rounded to int16 / int8 blocks: row by row, (4) steps of 4+ tokens on the blocked
    # GEMM (cpu_gemm8.cpp; the row kernel answers for it where VNNI is not built), and int16 over matrices packed
    # into panels (cpu_panel16.cpp, where it is built)
    [(0, 0, False), (16, 0, False), (8, 0, False), (16, 4, False), (8, 4, False), (16, 0, True)],
)
@pytest.mark.parametrize("march", ["native", "haswell", "x86-64"])
def test_the_stack_kernel_equals_its_torch_reference_on_every_cpu_path(
    march, bits, blocked_rows, panels, kernel_builds
):
    native = native_for(kernel_builds, march)
    layers, inv_freq, final_norm = _stack(0)
    kv_kernel = torch.zeros(10, len(layers), 2, SHAPE.block_size, SHAPE.kv_heads, SHAPE.head_dim)
    kv_reference = kv_kernel.clone()
    shape = dataclasses.replace(SHAPE, activation_bits=bits, blocked_rows=blocked_rows)
    if panels and not native.panels:
        pytest.skip("the panel kernel is built with AVX-512 VNNI only")
    packed = [_packed(native, layer) for layer in layers] if panels else layers
    kernel = StackKernel(native, shape, packed, inv_freq, final_norm, kv_kernel)
    tables = torch.tensor([[3, 5, 7, 0], [3, 2, 0, 0]], dtype=torch.int32)  # block 3 holds both sequences' start
    g = torch.Generator().manual_seed(1)
    for positions, rows in STEPS:
        if rows[0] == 1 and positions[0] == 0:
            tables[1, 0] = 6  # the second sequence's own first block (the first one's stays intact)
        hidden = torch.randn(len(positions), SHAPE.hidden, generator=g)
        args = (torch.tensor(positions), tables, torch.tensor(rows))
        got = kernel.forward(hidden.clone(), *args)
        want = forward_reference(shape, layers, inv_freq, final_norm, kv_reference, hidden.clone(), *args)
        # rounded activations: a float32 summation difference can move a value across a rounding boundary, one
        # step (amax / 32767 or / 127 of its block) - the bound is that step through the 4 layers, not float error
        atol = {0: 2e-5, 16: 1e-3, 8: 0.1}[bits]
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
        torch.testing.assert_close(kv_kernel, kv_reference, atol=atol, rtol=1e-5)
        assert (got - want).abs().mean() < atol / 10


@pytest.mark.parametrize("bits", [0, 16])
def test_attention_over_long_prefixes_equals_the_torch_reference(bits, kernel_builds):
    """Long prefixes take attention's 16-keys-at-a-time path, and a group of queries (a KV head's query heads, a
    sequence's tokens) walks the keys together: two sequences of 600 and 40 slots, then one step with a decode
    row of each and a 5-token proposal of the long one, against the reference from the same cache."""
    if native_build.compiler() is None:
        pytest.skip("no C++ compiler on this machine (the torch path serves)")
    native, why = load_native(kernel_builds)
    assert native is not None, why
    layers, inv_freq, final_norm = _stack(2)
    shape = dataclasses.replace(SHAPE, block_size=16, activation_bits=bits)
    kv = torch.zeros(48, len(layers), 2, 16, SHAPE.kv_heads, SHAPE.head_dim)
    kernel = StackKernel(native, shape, layers, inv_freq, final_norm, kv)
    tables = torch.tensor([list(range(1, 41)), list(range(41, 44)) + [0] * 37], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    for start in range(0, 600, 64):  # the prefixes, written by the kernel (its K/V agree with the reference's)
        positions = list(range(start, min(start + 64, 600))) + ([] if start else list(range(40)))
        rows = [0] * min(64, 600 - start) + ([] if start else [1] * 40)
        hidden = torch.randn(len(positions), SHAPE.hidden, generator=g)
        kernel.forward(hidden, torch.tensor(positions), tables, torch.tensor(rows))
    reference = kv.clone()
    positions, rows = [600, 40, 601, 602, 603, 604, 605], [0, 1, 0, 0, 0, 0, 0]
    hidden = torch.randn(len(positions), SHAPE.hidden, generator=g)
    args = (torch.tensor(positions), tables, torch.tensor(rows))
    got = kernel.forward(hidden.clone(), *args)
    want = forward_reference(shape, layers, inv_freq, final_norm, reference, hidden.clone(), *args)
    atol = {0: 2e-5, 16: 1e-3}[bits]
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
    torch.testing.assert_close(kv, reference, atol=atol, rtol=1e-5)


def _packed(native, layer: StackLayer) -> StackLayer:
    """The layer with its 4- and 8-bit matrices packed into panels (float32 ones stay as they are)."""
    mats = {name: getattr(layer, name) for name in ("qkv", "o", "gate_up", "down")}
    packed = {name: native.pack_panels(w) for name, w in mats.items() if w.fmt is not BlockFormat.F32}
    return dataclasses.replace(layer, **packed)


def test_packed_panels_are_refused_without_int16_activations(kernel_builds):
    native, why = load_native(kernel_builds)
    assert native is not None, why
    if not native.panels:
        pytest.skip("the panel kernel is built with AVX-512 VNNI only")
    layers, inv_freq, final_norm = _stack(0)
    kv = torch.zeros(10, len(layers), 2, SHAPE.block_size, SHAPE.kv_heads, SHAPE.head_dim)
    with pytest.raises(ValueError, match="int16 activations only"):
        StackKernel(native, SHAPE, [_packed(native, x) for x in layers], inv_freq, final_norm, kv)


def _engine(model_dir, native: bool, quantization: str = "int8", **overrides) -> LLMEngine:
    config = EngineConfig(model=str(model_dir), num_blocks=96, quantization=quantization, max_num_seqs=8, **overrides)
    engine = LLMEngine(config)
    if not native:
        engine.runner.native_step = None
    return engine


@pytest.mark.parametrize("quantization", ["int8", "none"])  # block codes; float32 matrices read in place
def test_an_engine_on_the_native_step_gives_the_torch_paths_tokens_and_logits(quantization, tiny_qwen_dir):
    native = _engine(tiny_qwen_dir, True, quantization)
    torch_path = _engine(tiny_qwen_dir, False, quantization)
    assert native.runner.kernel_path.endswith("+stack") and native.runner.native_step is not None
    assert torch_path.runner.native_step is None
    calls = {"native": 0}
    forward = native.runner.native_step.forward

    def counted(*args):
        calls["native"] += 1
        return forward(*args)

    native.runner.native_step.forward = counted
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    # together, the prompts (93 tokens > direct_rows) prefill on the torch path; then every decode step (4 rows,
    # within float_rows too) is native
    prompts = [list(range(3, 3 + n)) for n in (1, 5, 80, 7)]
    assert_same_answers((native, torch_path), prompts, greedy, bound=1e-3)
    assert calls["native"] >= greedy.max_tokens - 1  # every decode step took it (the prefill did not)
    before = calls["native"]
    alone = [[9, 8, 7]]  # prefilled in a native step of its own, then decoded there
    assert native.generate(alone, greedy)[0].token_ids == torch_path.generate(alone, greedy)[0].token_ids
    assert calls["native"] - before == greedy.max_tokens


def test_which_steps_and_engines_take_the_native_step(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, True)
    step = engine.runner.native_step
    assert step is not None and step.max_tokens == QuantConfig().direct_rows
    seq = Sequence("r", [1, 2, 3], SamplingParams(), block_size=16)
    assert step.takes(step.max_tokens, [seq]) and not step.takes(step.max_tokens + 1, [seq])
    seq.lora = LoRARef(name="a", path="/nowhere")
    assert not step.takes(1, [seq])  # adapters run on the torch path
    assert _engine(tiny_llama_dir, True, kv_dtype="fp8").runner.native_step is None  # fp8: the torch path's codec
    int8 = _engine(tiny_llama_dir, True, kv_dtype="int8").runner.native_step  # its own codec, at every width
    assert int8 is not None and int8.takes(10_000, [Sequence("s", [1, 2, 3], SamplingParams(), block_size=16)])
    plain = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64))  # float32: its matrices read in place
    assert plain.runner.kernel_path == "float+stack" and plain.runner.native_step is not None
    assert plain.runner.native_step.max_tokens == QuantConfig().float_rows  # wider: oneDNN's packed GEMM
    bf16 = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, dtype="bfloat16"))
    assert bf16.runner.native_step is None and bf16.runner.kernel_path == "float"


def test_the_step_ends_with_the_heads_logits_and_their_scan(kernel_builds):
    """`forward_logits`: the step, the picked tokens' states through a head packed into panels (with a bias), and
    each row's scan, in one call - the bits of `forward`, then the head's panel product, then `scan_logits`."""
    native, why = load_native(kernel_builds)
    assert native is not None, why
    if not native.panels:
        pytest.skip("the panel kernel is built with AVX-512 VNNI only")
    layers, inv_freq, final_norm = _stack(4)
    shape = dataclasses.replace(SHAPE, activation_bits=16)
    g = torch.Generator().manual_seed(5)
    head = native.pack_panels(quantize(torch.randn(300, SHAPE.hidden, generator=g) * 0.2, BlockFormat.Q8_0))
    bias = torch.randn(300, generator=g)
    kernels = []
    for _ in range(2):  # one kernel per path, each over its own cache
        kv = torch.zeros(10, len(layers), 2, SHAPE.block_size, SHAPE.kv_heads, SHAPE.head_dim)
        kernels.append(StackKernel(native, shape, [_packed(native, x) for x in layers], inv_freq, final_norm, kv))
    fused, plain = kernels
    assert not fused.has_head
    fused.set_head(head, bias)
    tables = torch.tensor([[3, 5, 7, 0], [6, 2, 0, 0]], dtype=torch.int32)
    for (positions, rows), pick in zip(STEPS, ([5], [0, 2], [0, 1], [3, 0, 1, 2])):
        hidden = torch.randn(len(positions), SHAPE.hidden, generator=g)
        args = (torch.tensor(positions), tables, torch.tensor(rows))
        logits, tokens, finite = fused.forward_logits(hidden.clone(), *args, pick)
        want = native.matmul_panels(plain.forward(hidden.clone(), *args)[pick], head) + bias
        assert torch.equal(logits, want)
        assert (tokens, finite) == native.scan_logits(want)
    with pytest.raises(ValueError, match="set_head"):
        plain.forward_logits(hidden, *args, [0])


def test_an_engine_whose_step_holds_the_head_gives_the_same_logits_bit_for_bit(tiny_qwen_dir):
    """With int16 activations the LM head is packed into panels and the native step computes the logits itself:
    every sampled row's logits and tokens are those of the step followed by the model's head, bit for bit."""
    from test_engine_correctness import _record_logits

    fused = _engine(tiny_qwen_dir, True, quant_activations="int16")
    if not fused.runner.native_step.kernel.has_head:
        pytest.skip("the panel kernel is built with AVX-512 VNNI only: the head stays the model's")
    apart = _engine(tiny_qwen_dir, True, quant_activations="int16")
    apart.runner.native_step.kernel._head = None  # the step, then the model's head (QuantLinear)
    seen = _record_logits(fused), _record_logits(apart)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [list(range(3, 3 + n)) for n in (1, 5, 7)]
    got = fused.generate(prompts, greedy), apart.generate(prompts, greedy)
    assert [r.token_ids for r in got[0]] == [r.token_ids for r in got[1]]
    for a, b in zip(*got):
        assert torch.equal(torch.stack(seen[0][a.request_id]), torch.stack(seen[1][b.request_id]))
