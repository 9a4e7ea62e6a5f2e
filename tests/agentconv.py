"""An agent conversation for tool-calling tests: three earlier weather look-ups (assistant tool calls with
`content: null`, tool results with `tool_call_id`), then a new question.  With greedy decoding the default
model answers it with a Hermes-format tool call for Rome, under both the default template and a tools-aware one
(checked by tests/test_tools.py)."""
import json

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tool_call(i: int, city: str) -> dict:
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


def weather_conversation(last: str = "What is the weather in Rome?") -> list[dict]:
    messages: list[dict] = []
    for i, city in enumerate(["Paris", "Berlin", "Madrid"]):
        messages += [{"role": "user", "content": f"What is the weather in {city}?"},
                     {"role": "assistant", "content": None, "tool_calls": [tool_call(i, city)]},
                     {"role": "tool", "tool_call_id": f"call_{i}", "content": "18 C"},
                     {"role": "assistant", "content": f"It is 18 C in {city}."}]
    return messages + [{"role": "user", "content": last}]
