"""Tool calling: templates see the tools, Hermes tool calls are parsed out of the output (whole and streamed),
and the default model, greedy, produces a parseable call under both the default and a tools-aware template."""
import json
from pathlib import Path

import pytest

from agentconv import WEATHER_TOOL, weather_conversation
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.tokenizer import Tokenizer
from disagg.protocol import SamplingParams
from disagg.http.tools import (ToolCallStream, parse_tool_calls, template_handles_tools, template_messages,
                               template_parses_hermes)

HERMES_TEMPLATE = (Path(__file__).parent / "data" / "hermes_tools.jinja").read_text()
TWO_CALLS = ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')


def test_parse_two_calls_keeps_content_and_json_arguments():
    content, calls = parse_tool_calls(TWO_CALLS, {"get_weather"})
    assert content == "Checking both."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_weather", {"city": "Rome"})]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


@pytest.mark.parametrize("text", [
    "no call at all",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": ',  # cut off mid-JSON
    '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',  # not an offered tool
    '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call> and then some prose',
])
def test_parse_rejects_what_is_not_a_clean_call(text):
    assert parse_tool_calls(text, {"get_weather"}) is None


def test_unterminated_last_call_is_accepted():
    _, calls = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}',
                                {"get_weather"})
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("piece", [1, 2, 5, 1000])
def test_stream_releases_content_before_the_call_and_the_calls_at_the_end(piece):
    stream = ToolCallStream({"get_weather"})
    out = "".join(stream.feed(TWO_CALLS[i:i + piece]) for i in range(0, len(TWO_CALLS), piece))
    rest, calls = stream.finish()
    assert out == "Checking both.\n" and rest == ""
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Rome"]


def test_stream_gives_back_held_text_that_is_not_a_call():
    stream = ToolCallStream({"get_weather"})
    assert stream.feed("a <tool") == "a "  # might be the start of a call: held
    assert stream.feed("box> b") == "<toolbox> b"  # was not
    stream = ToolCallStream({"get_weather"})
    assert stream.feed("<tool_call>{bad json") == ""
    assert stream.finish() == ("<tool_call>{bad json", [])  # nothing the model wrote is lost


def test_parallel_false_keeps_the_first_call_only():
    stream = ToolCallStream({"get_weather"}, parallel=False)
    stream.feed(TWO_CALLS)
    assert [json.loads(c.arguments)["city"] for c in stream.finish()[1]] == ["Paris"]


def test_tools_aware_template_gets_tools_and_object_arguments(smollm_dir):
    tok = Tokenizer.from_dir(smollm_dir)
    assert not template_handles_tools(tok.chat_template) and template_handles_tools(HERMES_TEMPLATE)
    messages, extra = template_messages(weather_conversation(), [WEATHER_TOOL], HERMES_TEMPLATE)
    assert extra == {"tools": [WEATHER_TOOL]}
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    tok.chat_template = HERMES_TEMPLATE
    text = tok.apply_chat_template(messages, **extra)
    assert json.dumps(WEATHER_TOOL) in text and '"arguments": {"city": "Paris"}' in text
    assert "<tool_response>\n18 C\n</tool_response>" in text


def test_plain_template_gets_tools_described_in_the_system_message(smollm_dir):
    tok = Tokenizer.from_dir(smollm_dir)
    messages, extra = template_messages(weather_conversation(), [WEATHER_TOOL], tok.chat_template)
    assert extra == {} and messages[0]["role"] == "system" and json.dumps(WEATHER_TOOL) in messages[0]["content"]
    assert all(isinstance(m["content"], str) for m in messages)  # no null content reaches a plain template
    text = tok.apply_chat_template(messages)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>' in text
    assert template_parses_hermes(tok.chat_template) and template_parses_hermes(HERMES_TEMPLATE)
    assert not template_parses_hermes("{% if tools %}[TOOL_CALLS]{% endif %}")  # another format: not parsed


@pytest.fixture(scope="module")
def engine(smollm_dir):
    return LLMEngine(EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=128))


@pytest.mark.parametrize("template", ["default", "hermes"])
def test_default_model_greedy_answers_with_a_parseable_call(smollm_dir, engine, template):
    tok = Tokenizer.from_dir(smollm_dir)
    if template == "hermes":
        tok.chat_template = HERMES_TEMPLATE
    messages, extra = template_messages(weather_conversation(), [WEATHER_TOOL], tok.chat_template)
    out = engine.generate([tok.encode_chat(messages, **extra)], SamplingParams(max_tokens=40, temperature=0))[0]
    content, calls = parse_tool_calls(out.text, {"get_weather"})
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather",
                                                                                      {"city": "Rome"})]
