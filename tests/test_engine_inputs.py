"""Bad input raises a clear error and the engine keeps serving everyone else; stop rules."""
import pytest

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.protocol import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, max_model_len=128))


@pytest.mark.parametrize("prompt, sampling, message", [
    ([], None, "prompt is empty"),
    (list(range(3, 200)), None, "the context holds 128"),
    ([1, 2, 10_000], None, "token ids must be integers"),
    ([1, -1], None, "token ids must be integers"),
    ([1, "a"], None, "token ids must be integers"),
    ("hello", None, "no tokenizer"),
    (42, None, "prompt must be"),
    ([1, 2], {"max_tokens": 0}, "max_tokens"),
    ([1, 2], {"max_tokens": -1}, "max_tokens"),
    ([1, 2], {"temperature": -1}, "temperature"),
    ([1, 2], {"top_p": 2}, "top_p"),
    ([1, 2], {"top_k": 0}, "top_k"),
    ([1, 2], {"temprature": 0.3}, "unknown sampling"),
    ([1, 2], {"stop": ["x"]}, "stop strings need a tokenizer"),
])
def test_bad_requests_raise_and_do_not_disturb_others(engine, prompt, sampling, message):
    engine.add_request("ok", [5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, sampling)
    assert "bad" not in engine.seqs
    done = []
    while engine.has_unfinished():
        done += [d for d in engine.step() if d.finished]
    assert [d.request_id for d in done] == ["ok"] and done[0].finish_reason == "length"
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    assert engine.abort("dup") and not engine.has_unfinished()


def test_abort_frees_blocks_mid_generation(engine):
    engine.add_request("x", list(range(3, 60)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.pool.num_free_blocks < engine.pool.num_blocks
    assert engine.abort("x")
    assert not engine.abort("x")
    assert engine.pool.num_free_blocks == engine.pool.num_blocks and not engine.has_unfinished()


def test_generation_stops_at_context_length(engine):
    res = engine.generate([list(range(3, 120))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert res.finish_reason == "length" and len(res.prompt_token_ids) + len(res.token_ids) == 128


def test_stop_token_ids_and_eos(engine):
    base = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    stop_at = base.token_ids[3]
    first = base.token_ids.index(stop_at)
    res = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at]))[0]
    assert res.finish_reason == "stop" and res.token_ids == base.token_ids[:first + 1]


def test_default_model_stop_strings_and_eos(smollm_dir):
    engine = LLMEngine(EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=128))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    full = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    assert full.finish_reason == "stop" and full.token_ids[-1] in engine.eos_token_ids  # stopped on EOS
    assert "Paris" in full.text
    cut = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, stop=["Paris"]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index("Paris")]
