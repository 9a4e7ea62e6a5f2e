"""TPOT-sized chunked prefill: the engine's online step-time fit, the chunk rule, and the scheduler keeping a step
that carries decodes within the time target (disagg/engine/step_time.py)."""
import random

import pytest

from disagg.config import EngineConfig
from disagg.engine.block_pool import BlockPool
from disagg.engine.engine import LLMEngine
from disagg.engine.scheduler import Scheduler
from disagg.engine.sequence import Sequence
from disagg.engine.step_time import ChunkRule, ChunkSizer, StepCoefficients, StepFit
from disagg.protocol import SamplingParams

TRUE = StepCoefficients(base=0.02, per_token=0.002, per_seq=0.003, per_attn=0.001)


def _fed(steps=64, prefill=True, decode=True, noise=0.0):
    fit = StepFit(window=256, refit_every=8, prefill_tokens=16)
    rng = random.Random(0)
    for i in range(steps):
        if prefill and (i % 2 or not decode):
            tokens, seqs, kp = rng.randrange(64, 512), rng.randrange(1, 4), rng.uniform(5, 200)
        else:
            seqs = rng.randrange(1, 32)
            tokens, kp = seqs, seqs * rng.uniform(0.1, 2.0)
        fit.add(tokens, seqs, kp, TRUE.predict(tokens, seqs, kp) * (1 + noise * rng.uniform(-1, 1)))
    return fit


def test_the_fit_recovers_the_step_model_and_stays_cold_on_one_kind_of_step():
    m = _fed().model
    assert m is not None
    for got, want in zip((m.base, m.per_token, m.per_seq, m.per_attn), (0.02, 0.002, 0.003, 0.001)):
        assert got == pytest.approx(want, rel=1e-6)
    assert _fed(noise=0.1).model.per_token == pytest.approx(0.002, rel=0.15)
    assert _fed(prefill=False).model is None  # decode-only: the per-token cost is not identifiable
    assert _fed(decode=False).model.per_token == pytest.approx(0.002)  # a prefill-only worker: chunks of all sizes
    same = StepFit(window=256, refit_every=8, prefill_tokens=16)
    for _ in range(64):  # every step a full 512-token chunk: base and per-token cost cannot be told apart
        same.add(512, 1, 130.0, TRUE.predict(512, 1, 130.0))
    assert same.model is None
    assert _fed(steps=6).model is None  # too few steps (under refit_every)


def test_the_rule_keeps_the_step_within_the_target():
    rule = ChunkRule(target_s=0.2, max_tokens=512, min_chunk=32, block_size=16)
    for decodes in (1, 4, 16):
        kp = decodes * 0.5
        for context in (0, 300):
            n = rule.tokens(TRUE, decodes, decodes, kp, context)
            step = TRUE.predict(decodes + n, decodes + 1, kp + n * (context + n) / 1000)
            assert n % 16 == 0 and 32 <= n < 512
            assert step <= 0.2  # within the target
            more = n + 16
            assert TRUE.predict(decodes + more, decodes + 1, kp + more * (context + more) / 1000) > 0.2  # largest
    assert rule.tokens(TRUE, 60, 60, 30.0, 0) == 32  # decodes alone past the target: prompts still progress
    assert ChunkRule(0.0, 512, 32, 16).tokens(TRUE, 4, 4, 1.0, 0) == 512  # no target: the fixed budget
    assert rule.tokens(TRUE, 0, 0, 0.0, 0) == 512  # no decodes: the fixed budget
    # pricing: a longer queue, more decodes, or a target all take longer
    slow = rule.prefill_seconds(TRUE, 2048, 8, 4000)
    assert rule.prefill_seconds(TRUE, 2048, 0, 0) < slow < rule.prefill_seconds(TRUE, 4096, 8, 4000)
    assert ChunkRule(0.0, 512, 32, 16).prefill_seconds(TRUE, 2048, 8, 4000) < slow


def _seq(rid, n, bs=16):
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(max_tokens=64), bs)


def _step(sched):
    batch = sched.schedule()
    sched.on_step_done(batch)
    for seq in batch.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
    return batch


def _fitted_sizer(target_s):
    fit = _fed()
    return ChunkSizer(fit, ChunkRule(target_s, max_tokens=512, min_chunk=32, block_size=16))


@pytest.mark.parametrize("sized", [True, False])
def test_the_scheduler_sizes_prompt_chunks_beside_decodes(sized):
    sizer = _fitted_sizer(0.15) if sized else None
    sched = Scheduler(BlockPool(512), 16, max_num_seqs=16, max_num_batched_tokens=512, chunking=sizer)
    for i in range(6):
        sched.add(_seq(f"d{i}", 20))
    _step(sched)  # the six short prompts, whole: nothing decodes yet, the fixed budget
    sched.add(_seq("long", 1500))
    decodes = {f"d{i}" for i in range(6)}
    for _ in range(3):
        batch = sched.schedule()
        step = TRUE.predict(batch.total_tokens, len(batch.seqs), batch.attention_kpairs())  # before it runs
        sched.on_step_done(batch)
        for seq in batch.seqs:
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(7)
        rows = dict(zip((s.request_id for s in batch.seqs), batch.num_new_tokens))
        assert decodes <= rows.keys() and all(rows[d] == 1 for d in decodes)  # no decode row is starved
        if sized:
            assert rows["long"] == sizer.last_budget and rows["long"] < 512
            assert step <= 0.15 + 1e-9
        else:
            assert rows["long"] >= 400 and step > 0.15, rows  # what the target prevents


def test_an_unfinished_prefill_ahead_of_decodes_takes_only_its_chunk():
    sizer = _fitted_sizer(0.1)
    sched = Scheduler(BlockPool(512), 16, max_num_seqs=16, max_num_batched_tokens=512, chunking=sizer)
    for i in range(4):
        sched.add(_seq(f"d{i}", 10))
    _step(sched)
    sched.add(_seq("long", 4000))
    _step(sched)
    sched.running.sort(key=lambda s: s.request_id != "long")  # first in the running list (as a priority puts it)
    batch = _step(sched)
    rows = dict(zip((s.request_id for s in batch.seqs), batch.num_new_tokens))
    assert [rows[f"d{i}"] for i in range(4)] == [1, 1, 1, 1]
    assert rows["long"] == sizer.last_budget < 512


def test_a_sized_engine_gives_the_same_tokens_and_keeps_its_steps_short(tiny_llama_dir):
    prompts = [list(range(3, 3 + n)) for n in (30, 20, 400, 350)]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    fixed = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=256, max_num_batched_tokens=512))
    sized = LLMEngine(
        EngineConfig(
            model=str(tiny_llama_dir), num_blocks=256, max_num_batched_tokens=512, prefill_chunk_target_ms=1.0
        )
    )
    sized.step_fit.model = StepCoefficients(base=0.0002, per_token=0.00001, per_seq=0.00002, per_attn=0.0)
    sized.step_fit.refit_every = 10**9  # keep the stand-in model: the tiny model's own steps are all noise
    assert [r.token_ids for r in fixed.generate(prompts, greedy)] == [
        r.token_ids for r in sized.generate(prompts, greedy)
    ]
    assert sized.chunking.last_budget is not None and sized.chunking.last_budget < 512
    assert sized.stats.steps > fixed.stats.steps


def test_an_engine_fits_its_step_time_from_its_own_steps(tiny_llama_dir):
    engine = LLMEngine(
        EngineConfig(model=str(tiny_llama_dir), num_blocks=256, max_num_batched_tokens=64, step_fit_every=4)
    )
    assert engine.step_fit.model is None  # cold
    prompts = [list(range(3, 3 + n)) for n in (300, 200, 250, 20)]
    engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    m = engine.step_fit.model
    assert m is not None and m.per_token > 0  # prompt chunks of 64 and decode-only steps: identifiable
