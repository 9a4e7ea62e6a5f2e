"""Request validation for the HTTP API: prompt tokens, sampling parameters against the context length, and the
priority (body field or header); the model name is checked by http/models.py.  Every problem is an InvalidRequest
(400 with an OpenAI error body, mapped in http/errors.py); nothing here touches the router."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from disagg.engine.tokenizer import Tokenizer
from disagg.errors import InvalidRequest
from disagg.http.tools import template_messages, template_parses_hermes
from disagg.protocol import SamplingParams

PRIORITY_HEADER = "x-priority"


def sampling_params(
    body: Any,
    max_tokens: int | None,
    prompt_len: int,
    max_model_len: int,
    logprobs: int | None = None,
    max_tokens_param: str = "max_tokens",
) -> SamplingParams:
    """The request's sampling parameters; max_tokens None = what the context has room for."""
    if prompt_len >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, "
            f"your prompt has {prompt_len} tokens.",
            param="prompt",
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise InvalidRequest(
            f"{max_tokens_param}={max_tokens} is too large: the prompt has {prompt_len} tokens and "
            f"the context holds {max_model_len}.",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stop_list(),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc


def tokenize_prompt(prompt: str | list[int] | list[str], tokenizer: Tokenizer) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise InvalidRequest("only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt is empty", param="prompt")
        return tokenizer.encode(prompt)
    ids = [t for t in prompt if isinstance(t, int)]
    if len(ids) != len(prompt) or any(t < 0 or t >= tokenizer.vocab_size for t in ids):
        raise InvalidRequest(f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    return ids


def priority_of(priority: int | None, headers: Mapping[str, str]) -> int:
    """The body's `priority`, else the X-Priority header, else 0 (higher = more important)."""
    if priority is not None:
        return priority
    header = headers.get(PRIORITY_HEADER)
    if header is None:
        return 0
    try:
        value = int(header)
    except ValueError:
        raise InvalidRequest(f"{PRIORITY_HEADER} must be an integer", param="priority") from None
    if not -100 <= value <= 100:
        raise InvalidRequest(f"{PRIORITY_HEADER} must be in [-100, 100]", param="priority")
    return value


def conversation_prompt(
    conversation: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tokenizer: Tokenizer,
    param: str = "messages",
    *,
    continue_final: bool = False,
    generation_prompt: bool = True,
) -> tuple[list[int], set[str] | None]:
    """Prompt token ids of chat messages (the template's form) with chat-format `tools` (shown to the model through
    the template, or described in the system message when the template has no tool support), and the tool names
    to parse out of the answer (None: do not parse).  Every API with a conversation comes through here, so the
    same conversation is the same prompt whichever API sent it.  `continue_final`: the last message is the start
    of the assistant's answer (a prefill), which the answer continues; `generation_prompt` False: the template's
    start of an assistant turn is left out (vLLM's add_generation_prompt)."""
    messages, extra = template_messages(conversation, tools, tokenizer.chat_template)
    try:
        ids = tokenizer.encode_chat(
            messages, continue_final_message=continue_final, add_generation_prompt=generation_prompt, **extra
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param) from exc
    if not tools or not template_parses_hermes(tokenizer.chat_template):
        return ids, None
    return ids, {t["function"]["name"] for t in tools}


def check_tool_results(messages: list[dict[str, Any]], param: str, answer: str, call: str) -> None:
    """Every tool result (`answer`, e.g. Responses' function_call_output) answers a tool call (`call`) made earlier
    in the conversation: a 400 naming the id otherwise."""
    made: set[str] = set()
    for m in messages:
        made.update(c["id"] for c in m.get("tool_calls") or ())
        if m["role"] == "tool" and m["tool_call_id"] not in made:
            raise InvalidRequest(
                f"{answer} {m['tool_call_id']!r} answers no {call} in the conversation",
                param=param,
                code="invalid_tool_result_id",
            )
