"""The speculation budget (engine/spec_budget.py) and the per-position acceptance record it reads (engine/spec.py).

- Step times are measured per row count, interpolated between counts and extrapolated beyond them.
- The plan keeps proposed tokens where the rows they take cost less than the tokens they are expected to give, and
  cuts them where a row costs what a plain token does; the most likely tokens of the whole batch go first.
- A sequence's rates are conditional per position and start from the engine's record; its first proposal, and
  one after `cooldown_steps` steps of proposals cut, is a probe, verified where rows are cheap.
- In the engine: with rows that cost as much as tokens, speculation stops, and the greedy output is plain
  decoding's either way.
"""

from dataclasses import replace

import pytest

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.drafting import _explores, propose_drafts
from disagg.engine.sequence import Sequence
from disagg.engine.spec import SpecConfig, SpecState, Speculator
from disagg.engine.spec_budget import DecodeStepTimes, chances, plan_lengths
from disagg.modes import SpecMethod
from disagg.protocol import SamplingParams
from tests.spec_fakes import FixedStepTimes

NGRAM = SpecConfig(method=SpecMethod.NGRAM, num_tokens=4, ngram_min=2, ngram_max=3)


def _table(cost) -> DecodeStepTimes:
    return FixedStepTimes(cost)


def _no_exploring(spec: Speculator) -> Speculator:
    """The next thousand plans are the budget's (none of the exploring ones that verify every proposal: those
    come at powers of two below explore_every)."""
    spec.config = replace(spec.config, explore_every=10**9)
    spec.plans = 1025
    return spec


def test_step_times_are_measured_per_row_count_interpolated_and_extrapolated():
    times = DecodeStepTimes(alpha=0.5)
    times.add(4, 0.010)
    assert not times.warm  # one row count says nothing of what another costs
    times.add(8, 0.400)  # a first step of a new shape: one-time costs
    times.add(8, 0.020)  # the second sample replaces it
    times.add(8, 0.030)  # then the EWMA: 0.025
    assert times.warm
    assert times.predict(8) == pytest.approx(0.025)
    assert times.predict(6) == pytest.approx(0.0175)  # between 4 and 8
    assert times.predict(12) == pytest.approx(0.040)  # along 4 -> 8
    assert times.predict(2) == pytest.approx(0.005)  # below the smallest, in proportion to the rows
    times.add(3, 0.0)  # a clock that did not move: ignored (a step never takes no time)
    assert times.predict(3) == pytest.approx(0.0075)
    times.add(16, 0.020)  # a wider step measured faster (another context): beyond it, never below it
    assert times.predict(20) == pytest.approx(0.020)


def test_cheap_rows_keep_every_likely_token_and_costly_rows_keep_none():
    cands = [chances([0.9, 0.9, 0.9, 0.9]), chances([0.8, 0.8])]
    cheap = _table(lambda r: 0.010 + 0.0002 * r)  # batch 1 on a bandwidth-bound machine: a row is ~2% of a step
    assert plan_lengths(cands, 2, cheap, floor=0.15) == [4, 2]
    costly = _table(lambda r: 0.006 * r - 0.001)  # a row costs more than a plain token's share: nothing pays
    assert plan_lengths(cands, 2, costly, floor=0.15) == [0, 0]
    assert plan_lengths([[1.0, 1.0]], 2, costly, floor=0.15) == [0]  # not even a certain token


def test_a_tie_keeps_the_fewest_rows():
    proportional = _table(lambda r: 0.005 * r)  # a certain token exactly pays for its row
    assert plan_lengths([[1.0, 1.0]], 2, proportional, floor=0.15) == [0]


def test_the_batchs_most_likely_tokens_go_first():
    # three rows; a row costs a fifth of a plain token: once the copying row's tokens are in, a token pays while
    # its chance beats a row's cost at the step's rate (about 0.3 here)
    times = _table(lambda r: 0.030 + 0.002 * r)
    copying, chatting = chances([0.95, 0.95, 0.95, 0.95]), chances([0.45, 0.2])
    assert plan_lengths([chatting, copying, [0.02]], 3, times, floor=0.15) == [1, 4, 0]
    assert chatting[1] == pytest.approx(0.09)  # its second token: too unlikely to pay


def test_cold_plans_keep_tokens_by_the_floor():
    cold = DecodeStepTimes(alpha=0.2)
    assert plan_lengths([chances([0.9, 0.5, 0.2]), [0.1]], 2, cold, floor=0.15) == [2, 0]


def _decoding(tokens: list[int], rid: str = "r") -> Sequence:
    seq = Sequence(rid, tokens[:-1], SamplingParams(max_tokens=64, temperature=0), block_size=16)
    seq.token_ids.append(tokens[-1])  # one output token: the sequence decodes
    seq.num_computed_tokens = seq.num_tokens - 1
    return seq


def test_a_probe_is_verified_where_rows_are_cheap_and_skipped_where_they_cost_a_token():
    """The engine's record says proposals fail (a run of chat).  A new sequence's first proposal is a probe,
    planned as if accepted half the time; after it, the sequence's own low rate cuts its proposals."""
    spec = _no_exploring(Speculator(NGRAM))
    spec.rates = [0.05] * NGRAM.num_tokens
    cheap = _table(lambda r: 0.010 + 0.002 * r)  # a row is a fifth of a token
    costly = _table(lambda r: 0.006 * r - 0.001)
    seq = _decoding([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3])
    spec.times = costly
    propose_drafts(spec, [seq], max_model_len=512)
    assert seq.draft == [] and seq.spec is not None and seq.spec.idle == 1
    spec.times = cheap
    propose_drafts(spec, [seq], max_model_len=512)
    assert seq.draft == [4]  # the probe's first token only: the next is as unlikely as the record says
    spec.record(seq.spec, proposed=1, accepted=0)
    propose_drafts(spec, [seq], max_model_len=512)
    assert seq.draft == [] and seq.spec.idle == 1  # no longer a probe: its own rate (0.025) does not pay
    seq.spec.idle = NGRAM.cooldown_steps
    propose_drafts(spec, [seq], max_model_len=512)
    assert seq.draft == [4]  # probed again after the cool-down


def test_rates_are_per_position_and_a_new_sequence_starts_from_the_engines_record():
    spec, state = Speculator(NGRAM), SpecState()
    assert spec.chances(state, 4) == [1.0] * 4  # nothing measured yet: proposals are tried
    spec.record(state, proposed=4, accepted=2)  # positions 1-2 accepted, 3 refused, 4 never reached
    # its first verification weighs as much as the record it started from; the engine's record moves by the EWMA
    assert state.rates == pytest.approx([1.0, 1.0, 0.5, 1.0])
    assert spec.rates == pytest.approx([1.0, 1.0, 0.7, 1.0])
    for _ in range(10):
        spec.record(state, proposed=4, accepted=0)
    assert state.rates[0] < 0.05 and state.rates[1:] == pytest.approx([1.0, 0.5, 1.0])  # the first refused
    fresh = SpecState()
    assert spec.chances(fresh, 2) == pytest.approx([spec.rates[0], spec.rates[0]])  # from the engine's record
    assert spec.rates[0] == pytest.approx(0.7**10)
    assert (spec.stats.proposed_tokens, spec.stats.accepted_tokens) == (44, 2)


def test_proposals_are_as_long_as_the_room_and_the_setting_allow():
    spec, tokens = Speculator(NGRAM), [1, 2, 3, 4, 5, 6, 7, 1, 2]
    assert spec.propose(SpecState(), tokens, room=16) == [3, 4, 5, 6]
    assert spec.propose(SpecState(), tokens, room=2) == [3, 4]


CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"


def _engine(model_dir, times: DecodeStepTimes | None = None) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir), kv_cache_memory_mb=64, max_model_len=512, speculative="ngram" if times else "none"
        )
    )
    if times is not None:
        assert engine.speculator is not None
        engine.speculator.times = times
    return engine


def test_the_engine_stops_speculating_where_rows_cost_what_tokens_do(smollm_dir):
    plain = _engine(smollm_dir)
    assert plain.tokenizer is not None
    asks = (f"Repeat this code exactly:\n{CODE}", f"Rewrite this with `add` renamed to `plus`:\n{CODE}")
    prompts = [plain.tokenizer.encode_chat([{"role": "user", "content": ask}]) for ask in asks]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    want = [r.token_ids for r in plain.generate(prompts, params)]
    free = _engine(smollm_dir, _table(lambda r: 0.010))  # rows cost nothing: every proposal is verified
    assert [r.token_ids for r in free.generate(prompts, params)] == want
    costly = _engine(smollm_dir, _table(lambda r: 0.006 * r - 0.001))
    assert [r.token_ids for r in costly.generate(prompts, params)] == want
    assert free.speculator is not None and costly.speculator is not None
    verified_free, verified_costly = free.speculator.stats.steps, costly.speculator.stats.steps
    # without the budget the two would verify alike (the same text, the same proposals); the costly engine verifies
    # only in its exploring plans (1, 2, 4 ... 32, then one in 64), so its row counts stay measured
    explores = sum(_explores(plan, NGRAM.explore_every) for plan in range(1, costly.stats.steps + 1))
    assert free.speculator.stats.accepted_tokens > 20
    assert 1 <= verified_costly <= 2 * explores < verified_free
    assert costly.stats.steps > free.stats.steps


def test_plans_explore_often_while_young_then_now_and_then():
    assert [p for p in range(1, 200) if _explores(p, 64)] == [1, 2, 4, 8, 16, 32, 64, 128, 192]
    costly = _table(lambda r: 0.006 * r - 0.001)
    every = Speculator(replace(NGRAM, explore_every=1))  # the bench's unbudgeted arm: every plan explores
    every.times = costly
    seq = _decoding([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3])
    for _ in range(3):
        propose_drafts(every, [seq], max_model_len=512)
        assert seq.draft == [4, 1, 2, 3]  # verified whatever the rows cost


def test_the_plans_rows_are_the_decoding_sequences_not_a_prefill_beside_them():
    """One decoding sequence beside one still prefilling: the plan weighs its proposal against a step of one
    decode row (where it pays), not two (where it would not)."""
    spec = _no_exploring(Speculator(NGRAM))
    spec.times = _table(lambda r: {1: 0.010, 2: 0.012}.get(r, 0.012 * r))  # the third row doubles the step
    decoding = _decoding([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3])
    prefilling = Sequence("p", list(range(40)), SamplingParams(max_tokens=8, temperature=0), block_size=16)
    propose_drafts(spec, [decoding, prefilling], max_model_len=512)
    assert decoding.draft[:1] == [4]


def test_the_engine_measures_decode_steps_by_their_rows_and_not_prompt_chunks(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=256, speculative="ngram"))
    assert engine.speculator is not None
    prompts = [([7, 8, 9, 10, 11] * 12)[: 40 + i] for i in range(3)]  # prompts of 40-42 tokens: one chunk each
    engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    measured = engine.speculator.times._rows
    # decode rows: 1-3 sequences, each with its proposal of at most 4 tokens; never a step that carried a prompt
    assert measured and max(measured) <= 3 * (1 + NGRAM.num_tokens) < 40


def test_a_preempted_sequences_old_proposal_is_not_verified_later():
    speculator = Speculator(NGRAM)
    seq = _decoding([1, 2, 3, 4, 1, 2, 3])
    seq.draft = [9, 9]  # planned for a step the sequence then missed (preempted before the scheduler took it)
    seq.num_computed_tokens = 0  # recomputing: not decoding, nothing proposed
    propose_drafts(speculator, [seq], max_model_len=512)
    assert seq.draft == []
