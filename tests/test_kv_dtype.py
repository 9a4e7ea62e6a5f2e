"""The KV cache's element format (`--kv-dtype`): int8 and fp8 with a scale per token and head, bfloat16.

What it must keep: the rounding error bounds of each format; a block ~3.9x smaller than float32's (the same MiB
holds that many more tokens, and a transfer moves that many fewer bytes); prefix hits, speculative verification,
peer reads and the CPU/disk tiers give exactly the tokens of an engine with the same format that recomputes
everything (the bytes are written once and moved, never re-rounded); and engines whose formats differ never use
each other's blocks - a peer read is refused and recomputed, a disk tier is another directory.  Quality against
float32 under teacher forcing is in test_quantization.py.
"""

import pytest
import torch

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.kv_format import KVFormat
from disagg.modes import KVDtype
from disagg.protocol import SamplingParams, Tier
from tests.kvutil import Node, connect, run, settle, tokens
from tests.spec_fakes import rows_free
from tests.test_engine_correctness import _record_logits
from tests.test_kv_seam import _disaggregated
from tests.test_kv_tiers import _demote_everything, _drop_device_cache, _serve, _tiers
from tests.test_speculative import _repetitive

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPT = list(range(40, 40 + 80))  # 5 full blocks of 16


def _reference(model_dir, prompts, kv_dtype, sampling=GREEDY):
    """An engine of that KV format that recomputes everything: no prefix cache, no peers, no tiers."""
    cfg = EngineConfig(model=str(model_dir), num_blocks=64, max_model_len=512, kv_dtype=kv_dtype,
                       enable_prefix_caching=False)
    return [r.token_ids for r in LLMEngine(cfg).generate(prompts, sampling)]


@pytest.mark.parametrize("kind", [KVDtype.INT8, KVDtype.FP8, KVDtype.BFLOAT16])
def test_each_format_rounds_within_its_bound_and_decodes_strided_views(kind):
    fmt = KVFormat(kind, 64, torch.float32)
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.01, 1.0, 300.0])[:, None]
    packed = fmt.encode(x)
    assert packed.dtype == fmt.storage and packed.shape[-1] == fmt.width
    amax = x.abs().amax(-1, keepdim=True)
    err = (fmt.decode(packed) - x).abs()
    # int8: half a step of amax/127 (plus the float16 scale's rounding); fp8 e4m3 and bfloat16: relative rounding
    bound = {KVDtype.INT8: amax / 127 * 0.51 + amax * 1e-3, KVDtype.FP8: x.abs() / 16 + amax / 448 * 2**-6,
             KVDtype.BFLOAT16: x.abs() / 256}[kind]
    assert (err <= bound + 1e-12).all()
    cache = torch.zeros(4, 2, 7, 3, fmt.width, dtype=fmt.storage)  # [blocks, K/V, tokens, heads, width]
    cache[2, 1] = packed
    assert torch.equal(fmt.decode(cache[:, 1][2]), fmt.decode(packed))  # a view of the cache, as attention reads
    if kind.quantized:
        assert torch.equal(fmt.decode(fmt.encode(torch.zeros(2, 64))), torch.zeros(2, 64))


def test_quantized_blocks_are_3_9x_smaller_and_the_same_memory_holds_that_many_more(tiny_llama_dir):
    fp32 = KVFormat(KVDtype.AUTO, 64, torch.float32)  # the default model: 30 layers, 3 KV heads of 64
    for kind in (KVDtype.INT8, KVDtype.FP8):
        ratio = fp32.bytes_per_token(30, 3) / KVFormat(kind, 64, torch.float32).bytes_per_token(30, 3)
        assert ratio == pytest.approx(4 * 64 / 66)  # 3.88x: a byte per value and a 2-byte scale per head
    assert fp32.bytes_per_token(30, 3) == 2 * KVFormat(KVDtype.BFLOAT16, 64, torch.float32).bytes_per_token(30, 3)
    sized = {kd: LLMEngine(EngineConfig(model=str(tiny_llama_dir), kv_cache_memory_mb=1, kv_dtype=kd))
             for kd in ("auto", "int8")}
    head_dim = sized["auto"].model_config.head_dim
    blocks = {kd: e.runner.num_blocks for kd, e in sized.items()}
    assert blocks["int8"] == pytest.approx(blocks["auto"] * 4 * head_dim / (head_dim + 2), rel=0.01)
    assert sized["int8"].kv_tensor.dtype == torch.uint8 and sized["int8"].kv_format == "int8"


def test_prefix_hits_and_speculation_on_int8_kv_give_the_tokens_of_recomputing(tiny_llama_dir):
    prompts = [PROMPT, PROMPT[:50] + list(range(400, 430))] + _repetitive(4)
    want = _reference(tiny_llama_dir, prompts, "int8")
    cached = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, max_model_len=512, kv_dtype="int8"))
    assert [r.token_ids for r in cached.generate(prompts[:1], GREEDY)] == want[:1]
    again = cached.generate(prompts, GREEDY)  # the first two reuse the first prompt's blocks
    assert [r.token_ids for r in again] == want
    assert [r.num_cached_tokens for r in again[:2]] == [64, 48]
    spec = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, max_model_len=512, kv_dtype="int8",
                                  speculative="ngram"))
    spec.speculator.times = rows_free()  # every proposal verified, whatever the steps cost on this machine
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in spec.generate(prompts, long)] == _reference(tiny_llama_dir, prompts, "int8", long)
    assert spec.speculator is not None and spec.speculator.stats.proposed_tokens > 0


def test_a_peer_read_moves_the_narrow_blocks_and_matches_recomputing(tiny_llama_dir):
    moved = {}
    for kd in ("auto", "int8"):
        prefill, decode = Node(tiny_llama_dir, kv_dtype=kd), Node(tiny_llama_dir, kv_dtype=kd)
        connect(prefill, decode)
        _disaggregated(prefill, decode, "r", PROMPT, GREEDY)
        out = run([prefill, decode], ["r"])
        assert tokens(out["r"]) == _reference(tiny_llama_dir, [PROMPT], kd)[0]
        assert decode.peer.num_reads == 1
        moved[kd] = decode.transport.bytes_read
        assert settle([prefill, decode])
    head_dim = prefill.engine.model_config.head_dim
    assert moved["auto"] / moved["int8"] == pytest.approx(4 * head_dim / (head_dim + 2))


def test_peers_with_other_kv_formats_never_read_each_others_blocks(tiny_llama_dir):
    prefill, decode = Node(tiny_llama_dir, kv_dtype="int8"), Node(tiny_llama_dir, kv_dtype="fp8")
    connect(prefill, decode)  # int8 and fp8 blocks have the same bytes: only the fingerprint tells them apart
    assert prefill.transport.layout().block_bytes == decode.transport.layout().block_bytes
    _disaggregated(prefill, decode, "x", PROMPT, GREEDY)
    out = run([prefill, decode], ["x"])
    assert tokens(out["x"]) == _reference(tiny_llama_dir, [PROMPT], "fp8")[0]  # recomputed in its own format
    assert decode.transport.bytes_read == 0 and decode.engine.scheduler.stats.failed_loads == 1
    prefill.engine.connector.release_lease("x")  # what the router does when the decode side fell back
    assert settle([prefill, decode])


def test_int8_blocks_round_trip_the_tiers_and_another_format_never_sees_them(tiny_llama_dir, tmp_path):
    node = Node(tiny_llama_dir, tiers=_tiers(tmp_path), kv_dtype="int8")
    want = _reference(tiny_llama_dir, [PROMPT], "int8", GREEDY)[0]
    assert tokens(_serve(node, "first", PROMPT, GREEDY)) == want
    _drop_device_cache(node)
    assert tokens(_serve(node, "from-cpu", PROMPT, GREEDY)) == want and node.store.stats.loaded_blocks[Tier.CPU] == 4
    _drop_device_cache(node)
    _demote_everything(node)
    out = _serve(node, "from-disk", PROMPT, GREEDY)
    assert tokens(out) == want and node.store.stats.loaded_blocks[Tier.DISK] == 4 and out[0].num_cached_tokens == 64
    assert settle([node])
    node.store.shutdown()  # the worker restarts with another --kv-dtype on the same disk root
    other = Node(tiny_llama_dir, tiers=_tiers(tmp_path), kv_dtype="fp8")
    assert other.store.index.disk is not None and len(other.store.index.disk) == 0
    assert tokens(_serve(other, "fp8", PROMPT, GREEDY)) == _reference(tiny_llama_dir, [PROMPT], "fp8", GREEDY)[0]
    assert other.store.stats.loaded_blocks[Tier.DISK] == 0


def test_an_unknown_kv_dtype_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"--kv-dtype 'int4' is not one of \['auto', 'float32', 'bfloat16'"):
        EngineConfig(kv_dtype="int4")


def test_every_batch_size_gives_a_row_the_same_bits():
    """What lets speculation keep a quantized KV cache's tokens: a batch-invariant packed GEMM (what an engine with
    both asks for) computes a row the same alone, in a verification of a few rows or in a batch of 32."""
    from disagg.engine.model import PackedLinear

    gen = torch.Generator().manual_seed(0)
    layer = PackedLinear(torch.randn(576, 1536, generator=gen) * 0.02, None, batch_invariant=True)
    x = torch.randn(32, 1536, generator=gen)
    with torch.inference_mode():
        batch = layer(x)
        assert all(torch.equal(layer(x[i : i + 1]), batch[i : i + 1]) for i in range(4))
        assert torch.equal(layer(x[:5]), batch[:5])


# float32 weights: the torch path with its batch-invariant GEMM; q4 + int16: the native step at every width, which
# also serves the prompt's chunks (a prompt prefilled in chunks of 16 against one chunk: the same tokens)
@pytest.mark.parametrize("quant", [{}, {"quantization": "q4", "quant_activations": "int16"}], ids=["float32", "q4"])
def test_speculation_on_the_default_model_with_int8_kv_changes_no_token(quant, smollm_dir):
    from tests.test_quant_spec_cluster import CODE

    # ~150 prompt tokens: a prompt prefilled whole is a step wider than direct_rows
    messages = [{"role": "user", "content": "Repeat this code exactly:\n" + CODE + CODE.replace("a", "x") + CODE}]
    outputs, logits = [], []
    for spec, chunk in (("none", 512), ("ngram", 512), ("none", 16)):
        engine = LLMEngine(EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=32, max_model_len=512,
                                        kv_dtype="int8", speculative=spec, max_num_batched_tokens=chunk, **quant))
        if quant:
            assert engine.runner.native_step is not None
        if engine.speculator is not None:
            engine.speculator.times = rows_free()  # every proposal verified, whatever the steps cost here
        prompt = engine.tokenizer.encode_chat(messages)
        assert len(prompt) > 64
        seen = _record_logits(engine)
        outputs.append(engine.generate([prompt], SamplingParams(max_tokens=48, temperature=0))[0].token_ids)
        logits.append(torch.stack(next(iter(seen.values()))))
        if spec == "ngram":
            assert engine.speculator is not None and engine.speculator.stats.accepted_tokens > 0
    assert outputs[0] == outputs[1] == outputs[2]
    # the same bits, not only the same tokens: every decode step's logits, the prompt prefilled whole or in chunks
    assert torch.equal(logits[0], logits[2])
