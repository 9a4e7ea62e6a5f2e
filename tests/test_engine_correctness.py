"""The paged engine against HF transformers on the same weights: tokens equal, logits close."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.protocol import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hf_greedy(hf, prompt, n):
    """Plain argmax over HF's full forward (generate's min_new_tokens would mask EOS, which ignore_eos keeps)."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(hf(torch.tensor([prompt + out])).logits[0, -1].argmax()))
    return out


def _record_logits(engine):
    """Wrap the runner so each sampled row's logits are kept, keyed by request id (observation only)."""
    seen: dict[str, list[torch.Tensor]] = {}
    original = engine.runner.compute_logits

    def compute_logits(batch):
        step = original(batch)
        for j, r in enumerate(step.rows):
            seen.setdefault(batch.seqs[r].request_id, []).append(step.logits[j].clone())
        return step

    engine.runner.compute_logits = compute_logits
    return seen


def assert_same_answers(engines, prompts, sampling, bound):
    """Two engines answer `prompts` with the same tokens, every sampled row's logits within `bound` of each other;
    their results, in order."""
    first, second = engines
    seen = _record_logits(first), _record_logits(second)
    got = first.generate(prompts, sampling), second.generate(prompts, sampling)
    assert [r.token_ids for r in got[0]] == [r.token_ids for r in got[1]]
    for a, b in zip(*got):
        diff = (torch.stack(seen[0][a.request_id]) - torch.stack(seen[1][b.request_id])).abs().max().item()
        assert diff < bound, f"max |logit diff| {diff:.2e}"
    return got


def _assert_matches_hf(engine, hf, prompts, n_tokens, atol):
    seen = _record_logits(engine)
    results = engine.generate(prompts, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True))
    for prompt, res in zip(prompts, results):
        assert res.token_ids == _hf_greedy(hf, prompt, n_tokens), f"prompt of {len(prompt)} tokens diverged"
        full = torch.tensor([prompt + res.token_ids[:-1]])
        with torch.no_grad():
            ref = hf(full).logits[0, len(prompt) - 1:].float()
        ours = torch.stack(seen[res.request_id])
        assert ours.shape == ref.shape
        max_err = (ours - ref).abs().max().item()
        assert max_err < atol, f"max |logit diff| {max_err:.2e} >= {atol}"


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen_dir"])
def test_tiny_models_match_hf_batched_mixed_lengths(model, request):
    model_dir = request.getfixturevalue(model)
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=128, max_model_len=512))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 7, 16, 33, 70, 130)]
    _assert_matches_hf(engine, _hf(model_dir), prompts, n_tokens=16, atol=1e-4)


def test_default_model_matches_hf(smollm_dir):
    """The real SmolLM2-135M: several chat prompts of different lengths batched together."""
    engine = LLMEngine(EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=256))
    tok = engine.tokenizer
    questions = ["What is the capital of France?", "Hi", "Explain photosynthesis to a child in two sentences.",
                 "List three prime numbers and say why they are prime."]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == len(prompts)
    _assert_matches_hf(engine, _hf(smollm_dir), prompts, n_tokens=10, atol=2e-3)


def test_chunked_prefill_gives_identical_output(tiny_llama_dir):
    prompts = [list(range(3, 3 + n)) for n in (90, 45, 140)]
    whole = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=128, max_num_batched_tokens=512))
    chunked = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=128, max_num_batched_tokens=24))
    steps_before = chunked.stats.steps
    a = [r.token_ids for r in whole.generate(prompts, GREEDY)]
    b = [r.token_ids for r in chunked.generate(prompts, GREEDY)]
    assert a == b
    assert chunked.stats.steps - steps_before > whole.stats.steps  # it really ran in more, smaller steps


def test_prefix_cache_hit_reuses_blocks_and_keeps_output(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=128, block_size=16))
    shared = list(range(10, 74))  # 64 tokens = 4 full blocks
    first = engine.generate([shared + [5, 6, 7]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    hits_before = engine.scheduler.stats.prefix_hit_tokens
    second = engine.generate([shared + [5, 6, 7]], GREEDY)[0]
    assert second.num_cached_tokens == 64
    assert engine.scheduler.stats.prefix_hit_tokens - hits_before == 64
    assert second.token_ids == first.token_ids
    cold = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=128, enable_prefix_caching=False))
    assert cold.generate([shared + [5, 6, 7]], GREEDY)[0].token_ids == first.token_ids
    # a different suffix after the shared prefix hits the prefix only
    third = engine.generate([shared + [9, 9]], GREEDY)[0]
    assert third.num_cached_tokens == 64


def test_preemption_under_block_pressure_keeps_outputs(tiny_llama_dir):
    prompts = [list(range(3 + i, 40 + i)) for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    roomy = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=256, max_model_len=128))
    expected = [r.token_ids for r in roomy.generate(prompts, params)]
    assert roomy.scheduler.stats.num_preemptions == 0
    tight = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=12, max_model_len=128))
    got = [r.token_ids for r in tight.generate(prompts, params)]
    assert tight.scheduler.stats.num_preemptions > 0
    assert got == expected
    assert tight.pool.num_free_blocks == tight.pool.num_blocks


def test_seeded_sampling_is_reproducible_under_batching_and_preemption(tiny_llama_dir):
    prompts = [list(range(3 + i, 40 + i)) for i in range(6)]
    params = [SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True)
              for i in range(6)]
    roomy = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=256, max_model_len=128))
    a = [r.token_ids for r in roomy.generate(prompts, params)]
    alone = roomy.generate([prompts[2]], [params[2]])[0].token_ids
    tight = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=10, max_model_len=128))
    b = [r.token_ids for r in tight.generate(prompts, params)]
    assert tight.scheduler.stats.num_preemptions > 0
    assert a == b and a[2] == alone


def test_continuous_batching_admits_requests_mid_flight(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=128, max_num_seqs=2))
    engine.add_request("a", list(range(5, 25)), GREEDY)
    engine.add_request("b", list(range(7, 30)), GREEDY)
    engine.add_request("c", list(range(9, 20)), GREEDY)
    engine.step()
    assert {s.request_id for s in engine.scheduler.running} == {"a", "b"}  # max_num_seqs respected
    finished, c_tokens = [], []
    for _ in range(100):
        for d in engine.step():
            if d.request_id == "c":
                c_tokens += d.token_ids
            if d.finished:
                finished.append(d.request_id)
        if not engine.has_unfinished():
            break
    assert sorted(finished) == ["a", "b", "c"]
    # c joined once a slot freed, and its output is what it gets alone
    solo = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=128))
    assert c_tokens == solo.generate([list(range(9, 20))], GREEDY)[0].token_ids
