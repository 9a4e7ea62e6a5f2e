"""What OpenAI-compatible agent frameworks send, through the official `openai` client against a real cluster
(1 prefill + 1 decode worker, default model, HTTP on 127.0.0.1): tools and tool turns, tool calls back as
`tool_calls` with finish_reason "tool_calls" (whole and streamed), logprobs for chat and completions checked
against HF transformers, and the directory the product writes loading as an HF causal LM."""
import json

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from agentconv import WEATHER_TOOL, weather_conversation
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.tokenizer import Tokenizer
from disagg.protocol import SamplingParams

QUESTION = [{"role": "user", "content": "Name the largest planet in the solar system."}]
# long enough (> 16 tokens) that the router sends its prefill to the prefill worker: the first token and its
# logprobs then come from that worker
LONG_QUESTION = [{"role": "user", "content": "In two sentences, explain why the sky is blue on a clear day and "
                                             "why sunsets are red."}]


@pytest.fixture(scope="module")
def service(pd_service):
    return pd_service


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(smollm_dir):
    return smollm_dir.name


@pytest.fixture(scope="module")
def hf(smollm_dir):
    """The product's model directory, loaded the way other tools load it (config.json names the class)."""
    return AutoModelForCausalLM.from_pretrained(str(smollm_dir), dtype=torch.float32).eval()


def _hf_greedy_logprobs(hf, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the log-softmax rows they were drawn from, by HF transformers."""
    out, rows = [], []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(hf(torch.tensor([ids + out])).logits[0, -1].float(), dim=-1)
            rows.append(logp)
            out.append(int(logp.argmax()))
    return out, rows


def test_model_dir_is_a_complete_hf_checkpoint(smollm_dir, hf):
    config = json.loads((smollm_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert type(hf).__name__ == "LlamaForCausalLM"
    engine = LLMEngine(EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=64, max_model_len=256))
    ids = engine.tokenizer.encode_chat(QUESTION)
    ours = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs


def test_agent_turn_with_tools_returns_tool_calls(client, model_name):
    reply = client.chat.completions.create(
        model=model_name, messages=weather_conversation(), tools=[WEATHER_TOOL], tool_choice="auto",
        parallel_tool_calls=True, response_format={"type": "text"}, metadata={"run": "t1"}, store=False,
        max_tokens=40, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Rome"}
    # the client sends the call back with the tool's answer: that turn is accepted too
    follow = weather_conversation() + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    again = client.chat.completions.create(model=model_name, messages=follow, tools=[WEATHER_TOOL],
                                           max_tokens=8, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_streamed_tool_calls_match_the_whole_answer(client, model_name):
    whole = client.chat.completions.create(model=model_name, messages=weather_conversation(),
                                           tools=[WEATHER_TOOL], max_tokens=40, temperature=0)
    chunks = list(client.chat.completions.create(model=model_name, messages=weather_conversation(),
                                                 tools=[WEATHER_TOOL], max_tokens=40, temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == \
        [(0, "get_weather", {"city": "Rome"})]
    assert json.loads(whole.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""  # no raw <tool_call>
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_without_tools_or_with_tool_choice_none_the_text_comes_back(client, model_name):
    for extra in ({}, {"tools": [WEATHER_TOOL], "tool_choice": "none"}):
        reply = client.chat.completions.create(model=model_name, messages=weather_conversation(), max_tokens=40,
                                               temperature=0, **extra)
        assert reply.choices[0].message.tool_calls is None
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_unsupported_tool_choice_is_a_clear_400(client, model_name):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_name, messages=QUESTION, tools=[WEATHER_TOOL],
                                       tool_choice="required")
    assert "guided" in str(err.value) and err.value.status_code == 400


@pytest.mark.parametrize("messages", [QUESTION, LONG_QUESTION], ids=["local-prefill", "remote-prefill"])
def test_chat_logprobs_match_hf(client, model_name, smollm_dir, hf, messages):
    reply = client.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6  # the prefill worker's first token included
    ids = Tokenizer.from_dir(smollm_dir).encode_chat(messages)
    tokens, rows = _hf_greedy_logprobs(hf, ids, 6)
    tok = Tokenizer.from_dir(smollm_dir)
    for entry, token, row in zip(content, tokens, rows):
        assert entry.token == tok.decode([token], skip_special_tokens=False)
        assert entry.logprob == pytest.approx(float(row[token]), abs=2e-3)
        top = row.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=2e-3)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the most likely
        assert entry.bytes == list(entry.token.encode())


def test_streamed_chat_logprobs_cover_every_token(client, model_name):
    whole = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=8, temperature=0,
                                           logprobs=True)
    chunks = list(client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=8,
                                                 temperature=0, logprobs=True, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == \
        [(e.token, round(e.logprob, 4)) for e in whole.choices[0].logprobs.content]
    assert all(e.top_logprobs == [] for e in streamed)


def test_completion_logprobs_match_hf_and_text(client, model_name, smollm_dir, hf):
    prompt = "The three primary colors are"
    reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    tokens, rows = _hf_greedy_logprobs(hf, Tokenizer.from_dir(smollm_dir).encode(prompt), 5)
    assert lp.token_logprobs == pytest.approx([float(r[t]) for t, r in zip(tokens, rows)], abs=2e-3)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v, abs=1e-6)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_seeded_sampling_logprobs_are_of_the_sampled_token(client, model_name, smollm_dir, hf):
    reply = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=4,
                                      temperature=1.0, seed=7, logprobs=0)
    lp = reply.choices[0].logprobs
    ids = Tokenizer.from_dir(smollm_dir).encode("Once upon a time")
    sampled = [Tokenizer.from_dir(smollm_dir).encode(t, add_special_tokens=False) for t in lp.tokens]
    with torch.no_grad():
        logits = hf(torch.tensor([ids + [s[0] for s in sampled]])).logits[0].float()
    expected = [float(torch.log_softmax(logits[len(ids) - 1 + i], -1)[s[0]]) for i, s in enumerate(sampled)]
    assert lp.token_logprobs == pytest.approx(expected, abs=2e-3)
