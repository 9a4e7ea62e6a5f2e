"""Tool calling for the chat endpoint: what the chat template sees, and tool calls parsed out of the output.

OpenAI-compatible agent frameworks send `tools`, assistant turns with `tool_calls` (and `content: null`) and `tool`
turns with `tool_call_id`.  Two kinds of chat template meet them:

- a tools-aware template (it references `tools`, e.g. Qwen2.5's or a Hermes-style one) renders them itself: it
  gets `tools` and the messages as HF transformers passes them (a tool call's `arguments` as an object);
- a template that knows nothing of tools (the default model's plain ChatML) would drop them silently, so the
  tools are described in the system message in the Hermes format, and past tool calls / results are written as
  the `<tool_call>` / `<tool_response>` text that format uses.

Output is parsed in the Hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the format of
Qwen2.5, Hermes 2/3 and our fallback) when the template uses it.  `ToolCallStream` does it incrementally for
SSE: text before the first `<tool_call>` streams as content; from there on it is held until the end, then
returned as tool calls (or, if it does not parse, as content: nothing the model wrote is lost).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"

_FALLBACK_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}'
    "\n</tool_call>"
)


def template_handles_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def template_parses_hermes(template: str | None) -> bool:
    """Whether output should be parsed for Hermes tool calls: the template uses that format, or has no tool
    format at all (then our fallback system prompt asks for it)."""
    return not template_handles_tools(template) or TOOL_CALL_START in (template or "")


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # the template shows it as text


def template_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables) for rendering `messages` with `tools` through `template`."""
    if template_handles_tools(template):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {
                        **c,
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": _arguments_object(c["function"]["arguments"]),
                        },
                    }
                    for c in m["tool_calls"]
                ]
            if m.get("content") is None:
                m["content"] = ""
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    return _as_hermes_text(messages, tools), {}


def _as_hermes_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            calls = "\n".join(
                f"{TOOL_CALL_START}\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": _arguments_object(c["function"]["arguments"])}
                )
                + f"\n{TOOL_CALL_END}"
                for c in m["tool_calls"]
            )
            content = f"{content}\n{calls}" if content else calls
        if m["role"] == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": m["role"], "content": content})
    if tools:
        described = _FALLBACK_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            body["index"] = index
        return body


def parse_tool_calls(text: str, allowed: set[str]) -> tuple[str, list[ToolCall]] | None:
    """(content before the calls, calls) from Hermes-format output; None if `text` holds no well-formed call to
    a known tool (the caller then returns the text as content)."""
    start = text.find(TOOL_CALL_START)
    if start == -1:
        return None
    calls, pos = [], start
    while text.startswith(TOOL_CALL_START, pos):
        end = text.find(TOOL_CALL_END, pos)
        body = text[pos + len(TOOL_CALL_START) : end if end != -1 else len(text)].strip()
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or call.get("name") not in allowed:
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append(ToolCall(call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
        if end == -1:  # the model stopped right after the JSON: accept the unterminated last call
            pos = len(text)
            break
        pos = end + len(TOOL_CALL_END)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if text[pos:].strip():
        return None  # prose after the calls: not a tool-call answer
    return text[:start].rstrip(), calls


class ToolCallStream:
    """Incremental version for SSE: `feed(text)` returns the content that can go out now; `finish()` returns
    (remaining content, tool calls)."""

    def __init__(self, allowed: set[str], parallel: bool = True) -> None:
        self.allowed, self.parallel = allowed, parallel
        self.held = ""  # text that is, or may be the start of, a tool call
        self.content = ""  # everything released as content so far

    def feed(self, text: str) -> str:
        self.held += text
        start = self.held.find(TOOL_CALL_START)
        if start != -1:
            out, self.held = self.held[:start], self.held[start:]
        else:  # hold back a tail that could be the start of "<tool_call>"
            keep = next(
                (
                    k
                    for k in range(min(len(TOOL_CALL_START) - 1, len(self.held)), 0, -1)
                    if TOOL_CALL_START.startswith(self.held[-k:])
                ),
                0,
            )
            out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        self.content += out
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        parsed = parse_tool_calls(self.held, self.allowed) if self.held.startswith(TOOL_CALL_START) else None
        if parsed is None:
            rest, self.held = self.held, ""
            return rest, []
        self.held = ""
        calls = parsed[1] if self.parallel else parsed[1][:1]
        return "", calls
