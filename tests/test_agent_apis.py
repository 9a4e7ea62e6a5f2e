"""The OpenAI Responses API and Anthropic's Messages API, through their official clients (`openai`, `anthropic`)
against a real cluster (1 prefill + 1 decode worker, default model, HTTP on 127.0.0.1): every request gives the
same tokens as the equivalent chat completion (text, tool calls, tool results, streamed or not), a follow-up turn
by `previous_response_id` reuses the conversation's KV, stored responses stay with their tenant, and bad input
gets each API's own 4xx.  Agent hints (`nvext`, `kv_hints`) are accepted whatever they hold."""
import json

import anthropic
import httpx
import openai
import pytest

from agentconv import WEATHER_TOOL, weather_conversation

SYSTEM = "You answer in one short sentence."
QUESTION = "Name the largest planet in the solar system."
FLAT_TOOL = {"type": "function", **WEATHER_TOOL["function"]}  # the Responses API's tool shape
# current anthropic clients have no `temperature` argument (the API samples at 1.0); older clients send it as a
# field, which is what extra_body does
GREEDY = {"temperature": 0}
ANTHROPIC_TOOL = {"name": "get_weather", "description": WEATHER_TOOL["function"]["description"],
                  "input_schema": WEATHER_TOOL["function"]["parameters"]}


@pytest.fixture(scope="module")
def service(pd_service):
    return pd_service


@pytest.fixture(scope="module")
def model_name(smollm_dir):
    return smollm_dir.name


@pytest.fixture(scope="module")
def oai(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(service):
    return anthropic.Anthropic(base_url=service.url, api_key="unused", max_retries=0, timeout=120)


def _chat(oai, model, messages, **kw):
    return oai.chat.completions.create(model=model, messages=messages, temperature=0, **kw).choices[0]


def _as_items(messages: list[dict]) -> list[dict]:
    """Chat messages as Responses input items."""
    items = []
    for m in messages:
        if m["role"] == "tool":
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]})
        elif m.get("tool_calls"):
            items += [{"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                       "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
        else:
            items.append({"role": m["role"], "content": m["content"]})
    return items


def _as_anthropic(messages: list[dict]) -> list[dict]:
    """Chat messages as Anthropic turns (tool results are user turns)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}]})
        elif m.get("tool_calls"):
            out.append({"role": "assistant", "content": [
                {"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                 "input": json.loads(c["function"]["arguments"])} for c in m["tool_calls"]]})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


# ---------------------------------------------------------------------------------------------- Responses API
def test_responses_text_equals_chat_whole_and_streamed(oai, model_name):
    chat = _chat(oai, model_name, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
                 max_tokens=12)
    whole = oai.responses.create(model=model_name, instructions=SYSTEM, input=QUESTION, max_output_tokens=12,
                                 temperature=0, store=False)
    assert whole.output_text == chat.message.content and whole.output_text
    assert whole.status == ("incomplete" if chat.finish_reason == "length" else "completed")
    assert whole.usage.output_tokens <= 12 and whole.usage.input_tokens > 0
    events = list(oai.responses.create(model=model_name, instructions=SYSTEM, input=QUESTION, max_output_tokens=12,
                                       temperature=0, stream=True, store=False))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete" if chat.finish_reason == "length" else "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == chat.message.content
    assert events[-1].response.output_text == chat.message.content
    # the client's own stream helper rebuilds the response from the events: one message, one text part
    with oai.responses.stream(model=model_name, instructions=SYSTEM, input=QUESTION, max_output_tokens=12,
                              temperature=0, store=False) as stream:
        rebuilt = stream.get_final_response()
    assert [len(item.content) for item in rebuilt.output] == [1]
    assert rebuilt.output_text == chat.message.content


def test_responses_tool_call_then_output_by_previous_response_id(oai, model_name):
    conversation = weather_conversation()
    chat = _chat(oai, model_name, conversation, tools=[WEATHER_TOOL], max_tokens=40)
    first = oai.responses.create(model=model_name, input=_as_items(conversation), tools=[FLAT_TOOL],
                                 max_output_tokens=40, temperature=0)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Rome"})
    assert json.loads(call.arguments) == json.loads(chat.message.tool_calls[0].function.arguments)
    # streamed: the same call, as function-call events
    events = list(oai.responses.create(model=model_name, input=_as_items(conversation), tools=[FLAT_TOOL],
                                       max_output_tokens=40, temperature=0, stream=True, store=False))
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == {"city": "Rome"}
    assert not [e for e in events if e.type == "response.output_text.delta"]  # no raw <tool_call> text
    # the next turn sends only the tool's output: the stored conversation supplies the rest
    follow = oai.responses.create(model=model_name, previous_response_id=first.id, tools=[FLAT_TOOL],
                                  input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}],
                                  max_output_tokens=16, temperature=0)
    full = conversation + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "21 C"}]
    again = _chat(oai, model_name, full, tools=[WEATHER_TOOL], max_tokens=16)
    assert follow.output_text == (again.message.content or "")
    assert follow.previous_response_id == first.id
    assert [(i.type, i.call_id) for i in oai.responses.input_items.list(follow.id)] == [("function_call_output",
                                                                                         call.call_id)]
    items = oai.responses.input_items.list(first.id, order="asc", limit=3)
    assert [i.type for i in items.data] == ["message", "function_call", "function_call_output"] and items.has_more
    with pytest.raises(openai.BadRequestError):
        oai.responses.input_items.list(first.id, after="msg_not_there")
    # the conversation's KV was reused: its first turn's prompt is cached
    assert follow.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 2


def test_responses_are_stored_per_tenant(service, oai, model_name):
    kept = oai.responses.create(model=model_name, input=QUESTION, max_output_tokens=4, temperature=0)
    assert oai.responses.retrieve(kept.id).output_text == kept.output_text
    [listed] = oai.responses.input_items.list(kept.id).data  # the one user message it was given
    assert (listed.type, listed.role, listed.content[0].text) == ("message", "user", QUESTION)
    other = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0,
                          default_headers={"X-Tenant-ID": "someone-else"})
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError) as err:
        other.responses.create(model=model_name, input="more", previous_response_id=kept.id, max_output_tokens=2)
    assert err.value.body["code"] == "response_not_found"  # the same answer as an id that never existed
    unstored = oai.responses.create(model=model_name, input=QUESTION, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(unstored.id)
    oai.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(kept.id)


@pytest.mark.parametrize("body, names", [
    ({"input": [{"type": "reasoning_summary", "text": "x"}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "1"}]}, "call_nope"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "hosted tool"),
    ({"input": "hi", "tool_choice": "required"}, "guided"),
    ({"input": "hi", "previous_response_id": "resp_unknown"}, "not found"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "include": ["message.output_text.logprobs"]}, "include"),
    ({"input": "hi", "tools": 5}, "tools"),  # wrongly typed JSON: the field's 400, never a 500
    ({"input": 7}, "input"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"not": "text"}}]}, "input"),
])
def test_responses_bad_input_is_an_openai_4xx(service, model_name, body, names):
    reply = httpx.post(f"{service.url}/v1/responses", json={"model": model_name, **body}, timeout=60)
    assert reply.status_code in (400, 404), reply.text
    assert names in reply.json()["error"]["message"] or names == reply.json()["error"]["param"]


# ---------------------------------------------------------------------------------------------- Messages API
def test_messages_text_equals_chat_whole_and_streamed(claude, oai, model_name):
    chat = _chat(oai, model_name, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
                 max_tokens=12)
    whole = claude.messages.create(model=model_name, system=SYSTEM, max_tokens=12, extra_body=GREEDY,
                                   messages=[{"role": "user", "content": QUESTION}])
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text == chat.message.content
    assert whole.stop_reason == ("max_tokens" if chat.finish_reason == "length" else "end_turn")
    assert whole.usage.output_tokens <= 12
    with claude.messages.stream(model=model_name, system=SYSTEM, max_tokens=12, extra_body=GREEDY,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == chat.message.content == final.content[0].text
    assert final.stop_reason == whole.stop_reason


def test_messages_count_tokens_is_the_prompt_create_runs(claude, oai, model_name):
    messages = [{"role": "user", "content": QUESTION}]
    counted = claude.messages.count_tokens(model=model_name, system=SYSTEM, messages=messages).input_tokens
    reply = claude.messages.create(model=model_name, system=SYSTEM, max_tokens=2, messages=messages)
    assert counted == reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    chat = oai.chat.completions.create(model=model_name, max_tokens=1,
                                       messages=[{"role": "system", "content": SYSTEM}, *messages])
    assert counted == chat.usage.prompt_tokens
    with_tools = claude.messages.count_tokens(model=model_name, messages=messages, tools=[ANTHROPIC_TOOL])
    assert with_tools.input_tokens > counted  # the tools are described to the model
    prefill = messages + [{"role": "assistant", "content": "The largest"}]  # counted, though create refuses it
    assert claude.messages.count_tokens(model=model_name, messages=prefill).input_tokens > counted


def test_messages_stop_sequence_is_named(claude, oai, model_name):
    chat = _chat(oai, model_name, [{"role": "user", "content": QUESTION}], max_tokens=12)
    stop = chat.message.content.split()[1]  # a word the answer holds
    reply = claude.messages.create(model=model_name, max_tokens=12, extra_body=GREEDY, stop_sequences=[stop],
                                   messages=[{"role": "user", "content": QUESTION}])
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)
    assert reply.content[0].text == chat.message.content[:chat.message.content.index(stop)]


def test_messages_tool_use_then_tool_result(claude, oai, model_name):
    conversation = weather_conversation()
    reply = claude.messages.create(model=model_name, max_tokens=40, extra_body=GREEDY, tools=[ANTHROPIC_TOOL],
                                   messages=_as_anthropic(conversation))
    assert reply.stop_reason == "tool_use"
    [use] = [b for b in reply.content if b.type == "tool_use"]
    assert (use.name, use.input) == ("get_weather", {"city": "Rome"})
    with claude.messages.stream(model=model_name, max_tokens=40, extra_body=GREEDY, tools=[ANTHROPIC_TOOL],
                                messages=_as_anthropic(conversation)) as stream:
        streamed = stream.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in streamed.content] == [("tool_use", {"city": "Rome"})]
    full = conversation + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "21 C"}]
    again = _chat(oai, model_name, full, tools=[WEATHER_TOOL], max_tokens=16)
    follow = claude.messages.create(model=model_name, max_tokens=16, extra_body=GREEDY, tools=[ANTHROPIC_TOOL],
                                    messages=_as_anthropic(full))
    assert "".join(b.text for b in follow.content if b.type == "text") == (again.message.content or "")


def test_a_final_assistant_turn_is_continued_as_chat_s_continue_final_message(claude, oai, model_name, smollm_dir):
    from disagg.engine.tokenizer import Tokenizer

    start = "The largest planet in the solar system is"
    turns = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": start}]
    tokenizer = Tokenizer.from_dir(smollm_dir)
    prompt = tokenizer.apply_chat_template(turns, continue_final_message=True)
    assert prompt.endswith(start) and prompt.startswith(tokenizer.apply_chat_template(turns[:1], add_generation_prompt=True))
    raw = oai.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0)  # the prefill by hand
    chat = _chat(oai, model_name, turns, max_tokens=12,
                 extra_body={"continue_final_message": True, "add_generation_prompt": False})
    prefilled = claude.messages.create(model=model_name, max_tokens=12, extra_body=GREEDY, messages=turns)
    assert chat.message.content == raw.choices[0].text  # the answer continues the start, not a new turn
    assert "".join(b.text for b in prefilled.content) == chat.message.content and chat.message.content
    counted = claude.messages.count_tokens(model=model_name, messages=turns).input_tokens  # Anthropic's usage: the
    assert prefilled.usage.input_tokens + prefilled.usage.cache_read_input_tokens == counted  # cached part apart
    with pytest.raises(openai.BadRequestError):  # as vLLM: both at once make no sense
        _chat(oai, model_name, turns, max_tokens=2, extra_body={"continue_final_message": True})


@pytest.mark.parametrize("change, error", [
    ({"model": "no-such-model"}, anthropic.NotFoundError),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "1"}]}]}, anthropic.BadRequestError),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     anthropic.BadRequestError),
    ({"tool_choice": {"type": "any"}, "tools": [ANTHROPIC_TOOL]}, anthropic.BadRequestError),
    ({"max_tokens": 0}, anthropic.BadRequestError),
])
def test_messages_bad_input_is_an_anthropic_4xx(claude, model_name, change, error):
    body = {"model": model_name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(error) as err:
        claude.messages.create(**body)
    assert err.value.body["type"] == "error" and err.value.body["error"]["message"]


@pytest.mark.parametrize("change, names", [
    ({"messages": True}, "messages"),  # wrongly typed JSON: the field's 400, never a 500
    ({"messages": [{"role": "user", "content": 3}]}, "messages"),
    ({"tools": {"name": "x"}}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is "}]},
     "trailing whitespace"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]}]}, "must be text"),
])
def test_messages_malformed_bodies_are_anthropic_400s(service, model_name, change, names):
    body = {"model": model_name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **change}
    reply = httpx.post(f"{service.url}/v1/messages", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["type"] == "error" and reply.json()["error"]["type"] == "invalid_request_error"
    assert names in reply.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- agent hints
def test_agent_hints_are_accepted_and_unknown_ones_counted(service, oai, model_name):
    messages = [{"role": "user", "content": QUESTION}]
    greedy = _chat(oai, model_name, messages, max_tokens=8).message.content
    hinted = oai.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=1.0, extra_body={
        "nvext": {"greed_sampling": True, "agent_hints": {"priority": 100, "osl": 8, "latency_sensitivity": 2.0,
                                                          "speculative_prefill": True, "mystery": 1},
                  "cache_control": {"type": "ephemeral", "ttl": "5m"}, "backend_instance_id": 7},
        "kv_hints": {"protocol_version": "0.1", "actions": [{"action_type": "kv.retain", "ttl_s": 60},
                                                            {"action_type": "kv.teleport"}]}})
    assert hinted.choices[0].message.content == greedy  # greed_sampling made it greedy
    for garbage in ({"nvext": "not an object"}, {"nvext": {"agent_hints": {"priority": "high", "osl": -3}}},
                    {"kv_hints": {"actions": "none"}}, {"kv_hints": [1, 2]}):
        reply = oai.chat.completions.create(model=model_name, messages=messages, max_tokens=2, extra_body=garbage)
        assert reply.choices[0].message.content is not None
    metrics = httpx.get(f"{service.url}/metrics", timeout=30).text
    counted = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("disagg:ignored_hints_total{")}
    assert counted["other"] >= 5  # mystery, kv.teleport, "not an object", actions "none", [1, 2]
    assert counted["priority"] >= 1 and counted["osl"] >= 1  # of the wrong type: ignored, never a 400
    assert counted.get("backend_instance_id") is None  # only known names label the counter
