"""A LLaVA served by our engine: token-exact with HF's LlavaForConditionalGeneration, images as prefix hits by
content, chunked prefill through an image, and bad image spans refused (disagg/vision/, engine/mm_inputs.py)."""

import pytest
import torch

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.mm_inputs import ImageEmbedding
from disagg.protocol import SamplingParams
from disagg.vision.encoder import VisionEncoder
from disagg.vision.images import INT32_LIMIT, content_hash, placeholder_ids
from disagg.vision.spec import VisionSpec
from tests.imagegen import png

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir):
    spec = VisionSpec.from_dir(tiny_vlm_dir)
    return tiny_vlm_dir, spec, VisionEncoder(tiny_vlm_dir)


def _hf_answer(model_dir, spec, encoder, text_ids, cuts, images):
    """HF's greedy tokens for text_ids with the image token at each cut (one per image)."""
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(model_dir)).float().eval()
    ids, last = [], 0
    for cut in cuts:
        ids += text_ids[last:cut] + [spec.image_token_id] * spec.tokens_per_image
        last = cut
    ids += text_ids[last:]
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pixel_values=encoder.pixels(images),
            max_new_tokens=GREEDY.max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def _ours(engine, rid, text_ids, cuts, images, encoder, spec):
    prompt, embeds, last = [], [], 0
    for cut, data in zip(cuts, images):
        prompt += text_ids[last:cut]
        key = content_hash(data)
        rows = encoder.encode([(key, data)])[0]
        embeds.append(ImageEmbedding.of(key, len(prompt), rows))
        prompt += placeholder_ids(key, spec.tokens_per_image, spec.vocab_size)
        last = cut
    prompt += text_ids[last:]
    engine.add_request(rid, prompt, GREEDY, images=embeds)
    tokens, cached = [], None
    while engine.has_unfinished():
        for d in engine.step():
            if d.request_id == rid:
                tokens += d.token_ids
                cached = d.num_cached_tokens if cached is None else cached
    return tokens, cached


def test_token_exact_with_hf_llava_through_chunks_and_prefix_hits(vlm):
    model_dir, spec, encoder = vlm
    text_ids = list(range(1000, 1040))
    cuts, images = [5, 23], [png(1), png(2)]
    expected = _hf_answer(model_dir, spec, encoder, text_ids, cuts, images)
    # 12-token chunks: both images are split across prefill steps
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_mb=16, max_num_batched_tokens=12))
    got, cached = _ours(engine, "a", text_ids, cuts, images, encoder, spec)
    assert got == expected and cached == 0
    again, cached = _ours(engine, "b", text_ids, cuts, images, encoder, spec)  # same images: a prefix hit
    assert again == expected and cached >= 64  # every full block (the last one is recomputed)
    other = [png(1), png(3)]  # the second image differs: the hit stops before it
    _, cached = _ours(engine, "c", text_ids, cuts, other, encoder, spec)
    assert 16 <= cached <= 5 + 16 + 18 and cached % 16 == 0


def test_placeholder_ids_are_above_the_vocabulary_and_differ_per_image():
    a, b = placeholder_ids("00" * 16, 64, 49153), placeholder_ids("01" + "00" * 15, 64, 49153)
    assert all(49153 <= t < INT32_LIMIT for t in a + b)
    assert a == placeholder_ids("00" * 16, 64, 49153) and len(set(a) & set(b)) == 0


def test_bad_image_spans_are_refused_and_leave_the_engine_untouched(vlm):
    model_dir, spec, encoder = vlm
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_mb=16))
    data = png(4)
    key = content_hash(data)
    rows = encoder.encode([(key, data)])[0]
    ids = placeholder_ids(key, spec.tokens_per_image, spec.vocab_size)
    cases = {
        "not image": ([1, 2] + ids, [ImageEmbedding.of(content_hash(png(5)), 2, rows)]),  # another image's ids
        "shifted": ([1, 2] + ids, [ImageEmbedding.of(key, 1, rows)]),
        "rows": ([1, 2] + ids, [ImageEmbedding(key, 2, len(rows), rows[:, :8])]),
        "no image": ([1, 2] + ids, []),  # placeholder ids with no image behind them
        "negative": ([-1, 2] + ids, [ImageEmbedding.of(key, 2, rows)]),  # text ids get the intake's own check
    }
    for name, (prompt, images) in cases.items():
        with pytest.raises(ValueError):
            engine.add_request(name, prompt, GREEDY, images=images)
    assert not engine.has_unfinished()


def test_the_encoder_caches_by_content(vlm):
    _, spec, encoder = vlm
    data = png(6)
    before = encoder.cache.hits
    first = encoder.encode([(content_hash(data), data)])[0]
    second = encoder.encode([(content_hash(data), data)])[0]
    assert first.shape == (spec.tokens_per_image, spec.hidden_size) and torch.equal(first, second)
    assert encoder.cache.hits == before + 1


def test_a_lazy_image_is_encoded_once_and_only_when_a_step_computes_it(vlm):
    model_dir, spec, encoder = vlm
    text_ids = list(range(1000, 1020))
    data = png(7)
    key = content_hash(data)
    calls = []

    def encode():
        calls.append(1)
        return encoder.encode([(key, data)])[0]

    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_mb=16, max_num_batched_tokens=12))
    eager, _ = _ours(engine, "eager", text_ids, [4], [data], encoder, spec)
    prompt = text_ids[:4] + placeholder_ids(key, spec.tokens_per_image, spec.vocab_size) + text_ids[4:]
    engine.add_request("lazy", prompt, GREEDY, images=[ImageEmbedding(key, 4, spec.tokens_per_image, encode)])
    assert calls == []  # added, not encoded
    lazy = []
    while engine.has_unfinished():
        lazy += [t for d in engine.step() for t in d.token_ids]
    assert lazy == eager and calls == []  # the image's blocks were a prefix hit: never computed, never encoded
    engine.pool.reset_prefix_cache()
    engine.add_request("cold", prompt, GREEDY, images=[ImageEmbedding(key, 4, spec.tokens_per_image, encode)])
    cold = []
    while engine.has_unfinished():
        cold += [t for d in engine.step() for t in d.token_ids]
    assert cold == eager and calls == [1]  # computed through two chunks, encoded once
