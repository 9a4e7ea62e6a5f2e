"""Speculative decoding by prompt lookup (`--speculative ngram`).

- The proposer finds the latest earlier occurrence of the longest n-gram that ends the tokens and proposes what
  followed, as much as the room and `--num-speculative-tokens` allow (how much a step verifies is the budget's,
  tests/test_spec_budget.py).
- Greedy output is token-for-token the output without speculation: batched, with chunked prefill, under
  preemption, with stop tokens and length limits, and with q4 weights; repeated text takes fewer model steps.
- Non-finite logits during a verification fall back to plain decoding for that step, counted.
- Bad settings are refused at start-up, naming the option.
"""

import pytest
import torch

from disagg.config import EngineConfig, FaultConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.faults import FaultInjector
from disagg.engine.sampler import verify_sampled
from disagg.engine.spec import SpecConfig, SpecState, Speculator, verify_greedy
from disagg.http.shape import Collected
from disagg.http.stream import usage
from disagg.modes import SpecMethod
from disagg.protocol import SamplingParams, hash_block_tokens
from tests.spec_fakes import rows_free

NGRAM = SpecConfig(method=SpecMethod.NGRAM, num_tokens=4, ngram_min=2, ngram_max=3)


def test_proposals_come_from_the_latest_match_of_the_longest_ngram():
    spec = Speculator(NGRAM)
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 5, 2, 3]
    # "2 3" occurred at 1-2 (then 9 9 1 2) and at 6-7 (then 7 8 5 5): the latest one wins
    assert spec.propose(SpecState(), tokens, room=4) == [7, 8, 5, 5]
    # the 3-gram "1 2 3" (at the start, then 9 9 4) beats the later 2-gram "2 3" (then 6 1 2)
    assert spec.propose(SpecState(), [1, 2, 3, 9, 9, 4, 2, 3, 6, 1, 2, 3], room=3) == [9, 9, 4]
    assert spec.propose(SpecState(), [5, 6, 7, 8], room=4) == []  # nothing repeats
    assert spec.propose(SpecState(), tokens, room=2) == [7, 8]


def test_the_index_follows_a_growing_sequence_and_its_rewinds():
    spec, state = Speculator(NGRAM), SpecState()
    tokens = [4, 5, 6, 4, 5]
    assert spec.propose(state, tokens, room=4) == [6, 4, 5]
    tokens += [6, 1]
    assert spec.propose(state, tokens, room=4) == []  # "6 1" is new
    tokens += [4, 5]
    assert spec.propose(state, tokens, room=4) == [6, 1, 4, 5]
    assert spec.propose(state, tokens[:5], room=4) == [6, 4, 5]  # cut back (a resumed request): rebuilt


def test_greedy_verification_accepts_the_matching_prefix_then_the_models_token():
    assert verify_greedy([5, 6, 7], [5, 6, 7, 8]) == (3, 8)  # all accepted: the bonus token
    assert verify_greedy([5, 6, 7], [5, 9, 7, 8]) == (1, 9)  # the first mismatch is replaced
    assert verify_greedy([5], [4, 1]) == (0, 4)


def _repetitive(n):
    """Prompts whose text repeats (the tiny model continues such loops, so proposals get accepted)."""
    return [([7, 8, 9, 10, 11] * (3 + i))[: 12 + 9 * i] for i in range(n)]


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen_dir"])
def test_greedy_output_is_unchanged_by_speculation(model, request):
    model_dir = str(request.getfixturevalue(model))
    prompts = _repetitive(6) + [list(range(3, 3 + n)) for n in (5, 40, 90)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (3, 17, 40, 64, 5, 33, 48, 20, 1)]
    plain = LLMEngine(EngineConfig(model=model_dir, num_blocks=256, max_num_batched_tokens=64))
    spec = LLMEngine(EngineConfig(model=model_dir, num_blocks=256, max_num_batched_tokens=64, speculative="ngram"))
    spec.speculator.times = rows_free()  # every proposal verified, however rarely the tiny model accepts
    want = [r.token_ids for r in plain.generate(prompts, params)]
    assert [r.token_ids for r in spec.generate(prompts, params)] == want
    assert [len(t) for t in want] == [p.max_tokens for p in params]
    # random tiny models rarely follow their prompt's loops: proposals are made and almost all rejected, which
    # must not change a token (the default model below accepts them)
    assert spec.speculator.stats.proposed_tokens > 0


CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"


def _code_prompt(tokenizer):
    return tokenizer.encode_chat([{"role": "user", "content": f"Repeat this code exactly:\n{CODE}"}])


@pytest.fixture(scope="module")
def default_engines(smollm_dir):
    def make(**kw):
        return LLMEngine(EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=64, max_model_len=512, **kw))

    plain, spec = make(), make(speculative="ngram")
    spec.speculator.times = rows_free()  # these tests are of verification: the budget (its own tests) keeps it all
    return plain, spec


def test_repeated_text_is_decoded_in_fewer_steps_with_the_same_tokens(default_engines):
    plain, spec = default_engines
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    prompt = _code_prompt(plain.tokenizer)
    steps, outputs = [], []
    for engine in (plain, spec):
        before = engine.stats.steps
        outputs.append(engine.generate([prompt], params)[0].token_ids)
        steps.append(engine.stats.steps - before)
    assert outputs[1] == outputs[0]
    assert spec.speculator.stats.accepted_tokens > 0
    assert steps[1] < 0.8 * steps[0], steps


def test_every_computed_block_of_a_speculating_request_reaches_the_prefix_cache(default_engines):
    _, spec = default_engines
    spec.pool.reset_prefix_cache()
    prompt = _code_prompt(spec.tokenizer)
    tokens = (
        prompt + spec.generate([prompt], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))[0].token_ids
    )
    assert spec.speculator.stats.accepted_tokens > 0
    bs, hashes, parent = spec.config.block_size, [], None
    for i in range((len(tokens) - 1) // bs):  # the last token is never computed
        parent = hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs])
        hashes.append(parent)
    assert set(hashes) <= set(spec.pool.cached_hashes())


def test_stop_tokens_and_length_limits_end_a_speculating_request_where_plain_decoding_does(default_engines):
    plain, spec = default_engines
    prompt = _code_prompt(plain.tokenizer)
    free = plain.generate([prompt], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))[0].token_ids
    for params in (
        SamplingParams(max_tokens=48, temperature=0, stop_token_ids=[free[30]]),
        SamplingParams(max_tokens=21, temperature=0, ignore_eos=True),
    ):
        want, got = plain.generate([prompt], params)[0], spec.generate([prompt], params)[0]
        assert (got.token_ids, got.finish_reason, got.text) == (want.token_ids, want.finish_reason, want.text)
    assert len(got.token_ids) == 21


def test_speculation_under_preemption_gives_the_same_tokens(tiny_llama_dir):
    prompts = _repetitive(8)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    want = [
        r.token_ids
        for r in LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=256)).generate(prompts, params)
    ]
    small = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=24, max_model_len=128, speculative="ngram"))
    small.speculator.times = rows_free()
    assert [r.token_ids for r in small.generate(prompts, params)] == want
    assert small.scheduler.stats.num_preemptions > 0 and small.speculator.stats.steps > 0


def test_speculation_with_q4_weights_keeps_the_float32_tokens(smollm_dir):
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    plain = LLMEngine(EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=64, max_model_len=512))
    prompts = [_code_prompt(plain.tokenizer)]
    want = [r.token_ids for r in plain.generate(prompts, params)]
    spec = LLMEngine(
        EngineConfig(
            model=str(smollm_dir), kv_cache_memory_mb=64, max_model_len=512, quantization="q4", speculative="ngram"
        )
    )
    spec.speculator.times = rows_free()
    assert [r.token_ids for r in spec.generate(prompts, params)] == want
    assert spec.speculator.stats.accepted_tokens > 0


def test_non_finite_logits_in_a_verification_fall_back_and_are_counted(smollm_dir):
    engine = LLMEngine(
        EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=64, max_model_len=512, speculative="ngram")
    )
    engine.speculator.times = rows_free()
    engine.add_request("r", _code_prompt(engine.tokenizer), SamplingParams(max_tokens=64, temperature=0))
    while engine.speculator.stats.steps == 0 and engine.has_unfinished():  # until a proposal was verified
        engine.step()
    assert engine.speculator.stats.steps > 0
    engine.runner.faults = FaultInjector(FaultConfig(nan_from_step=0))
    while engine.speculator.stats.fallbacks == 0 and engine.has_unfinished():
        engine.step()
    assert engine.speculator.stats.fallbacks >= 1
    assert [f.request_id for f in engine.drain_output_faults()] == ["r"]  # failed explicitly, never a wrong token


def test_bad_speculation_settings_are_refused_at_start_up():
    with pytest.raises(ValueError, match="--speculative 'eagle'"):
        EngineConfig(speculative="eagle")
    for n in (0, 10_000):
        with pytest.raises(ValueError, match="--num-speculative-tokens"):
            EngineConfig(speculative="ngram", num_speculative_tokens=n)


def test_each_request_reports_its_proposed_and_accepted_tokens_in_its_usage(default_engines):
    _, spec = default_engines
    spec.add_request("u", _code_prompt(spec.tokenizer), SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    answer = Collected()
    while spec.has_unfinished():
        for delta in spec.step():
            if delta.request_id == "u":
                answer.add(delta)
    assert answer.num_tokens == 48 and 0 < answer.num_accepted_tokens <= answer.num_proposed_tokens
    use = usage(10, answer.num_tokens, 0, answer.num_proposed_tokens, answer.num_accepted_tokens)
    details = use["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] == answer.num_accepted_tokens
    assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] == answer.num_proposed_tokens
    assert "completion_tokens_details" not in usage(10, 48)  # no speculation: OpenAI's plain usage


CHI2_DF5_P001 = 20.515  # chi-square critical value, 5 degrees of freedom, p = 0.001


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_speculative_sampling_keeps_the_models_distribution():
    """Fixed seeds, a 6-token vocabulary, proposals [2, 4]: the first emitted token is distributed as p0 (whether
    the proposal was kept or not), and after keeping 2 the next one as p1.  A rule that keeps a proposal more
    often than p(d) (or, on a refusal, draws from p0 without removing the refused token after a coin was spent on
    it) over-weights the proposal and fails this."""
    p = torch.tensor([[0.10, 0.15, 0.30, 0.05, 0.25, 0.15], [0.20, 0.05, 0.10, 0.25, 0.30, 0.10], [1 / 6] * 6])
    first, second = torch.zeros(6), torch.zeros(6)
    for trial in range(20_000):
        gens = [torch.Generator().manual_seed(trial * 3 + i) for i in range(3)]
        accepted, token = verify_sampled([2, 4], p, gens)
        first[2 if accepted >= 1 else token] += 1
        if accepted >= 1:
            second[4 if accepted >= 2 else token] += 1
    assert _chi2(first, p[0]) < CHI2_DF5_P001
    assert _chi2(second, p[1]) < CHI2_DF5_P001
    assert abs(first[2] / first.sum() - 0.30) < 0.02 and second.sum() > 5000


def test_a_seeded_sampled_request_gets_plain_samplings_tokens_whatever_was_proposed(default_engines):
    """Verification draws each position's token as plain sampling does and keeps proposals while they match, so
    how many tokens the budget verified (which follows step times and the batch) never changes a seeded answer,
    nor does a migration to a worker with another speculation history."""
    plain, spec = default_engines
    prompt = _code_prompt(spec.tokenizer)
    params = SamplingParams(max_tokens=48, temperature=0.7, seed=11, ignore_eos=True)
    want = plain.generate([prompt], params)[0].token_ids
    before = (spec.speculator.stats.steps, spec.speculator.stats.accepted_tokens)
    assert spec.generate([prompt], params)[0].token_ids == want
    assert spec.speculator.stats.steps > before[0] and spec.speculator.stats.accepted_tokens > before[1]
    assert spec.generate([prompt], params)[0].token_ids == want  # again, from another speculation history
