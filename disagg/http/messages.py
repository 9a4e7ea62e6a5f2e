"""Anthropic's Messages API: `POST /v1/messages` (JSON or SSE), for clients and agent frameworks that speak it.

The request becomes a chat conversation (http/messages_schema.py) served like a chat completion
(http/serving.py), so the same conversation gives the same tokens through either API.  The answer is a Message:
a `text` block, then a `tool_use` block per tool call (its `input` the call's arguments as an object), with
`stop_reason` "end_turn", "max_tokens", "stop_sequence" (and the `stop_sequence` that matched) or "tool_use".
`usage.input_tokens` counts the prompt tokens computed for this request and `cache_read_input_tokens` those
served from cached KV (Anthropic's split).  Streaming sends Anthropic's events:

    message_start, [content_block_start, content_block_delta (text_delta)..., content_block_stop] (the text),
    [content_block_start (tool_use), content_block_delta (input_json_delta), content_block_stop]... (each call),
    message_delta (stop_reason, usage), message_stop

and, when the stream fails after the headers went out, an `error` event.  `POST /v1/messages/count_tokens` counts
a request's prompt tokens the same way.  Errors before that are Anthropic's
error bodies with the statuses of every other endpoint (http/errors.py).  Keys come as `x-api-key` (http/auth.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest

from disagg.errors import DisaggError, InvalidRequest
from disagg.http.errors import Dialect, sse_error, unexpected
from disagg.http.file_images import inline_message_files
from disagg.http.file_store import FileStorePort
from disagg.http.hints import read_hints
from disagg.http.images import image_token, load_images, place_images
from disagg.http.inputs import check_tool_results, conversation_prompt, sampling_params
from disagg.http.messages_schema import CountTokensRequest, MessagesRequest
from disagg.http.resume import LAST_EVENT_ID, Cursor, ResumeToken, TypedEvents
from disagg.http.serving import CallOptions, Server
from disagg.http.shape import AnswerShape, Collected
from disagg.http.stream import with_first
from disagg.protocol import FinishReason, Request, TokenDelta


def _stop_reason(finish: str | None, matched_stop: str | None, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_use"
    if finish == FinishReason.LENGTH:
        return "max_tokens"
    return "stop_sequence" if matched_stop is not None else "end_turn"


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call["function"]["arguments"]
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = arguments
    return {
        "type": "tool_use",
        "id": call["id"],
        "name": call["function"]["name"],
        "input": value if isinstance(value, dict) else {"arguments": value},
    }


@dataclass
class MessagesRender:
    model: str
    shape: AnswerShape

    def message(self, request: Request, content: list, stop: tuple[str | None, str | None], out: int, cached: int):
        return {
            "id": f"msg_{request.request_id.split('-', 1)[-1]}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": {
                "input_tokens": len(request.prompt_token_ids) - cached,
                "cache_read_input_tokens": cached,
                "cache_creation_input_tokens": 0,
                "output_tokens": out,
            },
        }

    async def body(self, request: Request, answer: Collected) -> dict[str, Any]:
        message = self.shape.final_choice(answer)["message"]
        calls = message.get("tool_calls") or []
        content = [{"type": "text", "text": message["content"]}] if message["content"] else []
        content += [_tool_use(c) for c in calls]
        reason = _stop_reason(answer.finish_reason, answer.matched_stop, bool(calls))
        stop = (reason, answer.matched_stop if reason == "stop_sequence" else None)
        return self.message(request, content, stop, answer.num_tokens, answer.num_cached_tokens)

    async def events(
        self,
        first: TokenDelta,
        deltas: AsyncGenerator[TokenDelta, None],
        request: Request,
        cursor: Cursor,
        after: ResumeToken | None = None,
    ) -> AsyncIterator[str]:
        """The stream's events, each with its `id:`; `after`: a resumed stream's Last-Event-ID (events up to it come
        back empty: http/resume.py)."""
        typed = TypedEvents(cursor, after)

        def event(type_: str, **fields: Any) -> str:
            return typed(type_, fields)

        cached = first.num_cached_tokens
        yield event("message_start", message=self.message(request, [], (None, None), 0, cached))
        index, text_open, n_out = 0, False, 0
        finish, matched = None, None
        calls: list[dict[str, Any]] = []
        try:
            async for delta in with_first(first, deltas):
                n_out += len(delta.token_ids)
                cursor.advance(len(delta.token_ids))
                finish, matched = delta.finish_reason or finish, delta.matched_stop or matched
                choice = self.shape.stream_choice(delta)
                if choice is None:
                    continue
                piece = choice["delta"].get("content") or ""
                if piece and not text_open:
                    text_open = True
                    yield event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                if piece:
                    yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": piece})
                calls += choice["delta"].get("tool_calls") or []
            if text_open:
                yield event("content_block_stop", index=index)
                index += 1
            for call in calls:
                block = _tool_use(call)
                yield event("content_block_start", index=index, content_block={**block, "input": {}})
                partial = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
                yield event("content_block_delta", index=index, delta=partial)
                yield event("content_block_stop", index=index)
                index += 1
            reason = _stop_reason(finish, matched, bool(calls))
            stop = {"stop_reason": reason, "stop_sequence": matched if reason == "stop_sequence" else None}
            yield event("message_delta", delta=stop, usage={"output_tokens": n_out})
            yield event("message_stop")
        except Exception as exc:  # never a silently cut stream
            yield sse_error(exc if isinstance(exc, DisaggError) else unexpected(exc), Dialect.ANTHROPIC)
        finally:
            await deltas.aclose()


def _prefill(conversation: list[dict[str, Any]], *, strict: bool = True) -> bool:
    """A final assistant turn is the start of the answer, which the answer continues (Anthropic's prefill): text
    only, and not ending in white space (Anthropic refuses that too: the model would continue after it oddly).
    Not `strict` (counting tokens): any text is counted as a prefill, anything else as a turn, never refused."""
    last = conversation[-1]
    if last["role"] != "assistant":
        return False
    if not strict:
        return not last.get("tool_calls") and isinstance(last.get("content"), str) and bool(last["content"])
    if last.get("tool_calls") or not isinstance(last.get("content"), str) or not last["content"]:
        raise InvalidRequest("a final assistant turn (a prefill) must be text", param="messages")
    if last["content"] != last["content"].rstrip():
        raise InvalidRequest("final assistant content cannot end with trailing whitespace", param="messages")
    return True


def add_messages_routes(app: FastAPI, server: Server, files: FileStorePort) -> None:
    """`files`: the uploads an image block's `file` source names (the Files API's store)."""

    @app.post("/v1/messages")
    async def create(body: MessagesRequest, http: HTTPRequest):
        served = await server.model(body.model)
        tokenizer = served.tokenizer
        body = await inline_message_files(body, files, http.state.caller.tenant, served, server.config.images)
        loaded = await load_images(body.image_urls(), served, server.config.images, "messages")
        conversation, offered = body.conversation(image_token(served)), body.offered_tools()
        check_tool_results(conversation, "messages", "tool_result tool_use_id", "tool_use")
        prefill = _prefill(conversation)
        ids, tools = conversation_prompt(conversation, offered, tokenizer, continue_final=prefill)
        ids, images = place_images(served, ids, loaded, "messages")
        sampling = sampling_params(body, body.max_tokens, len(ids), served.max_model_len)
        shape = AnswerShape(tokenizer, chat=True, tools=tools, parallel_tool_calls=body.parallel_tool_calls())
        options = CallOptions(
            stream=body.stream,
            session=body.metadata.user_id if body.metadata is not None else None,
            kv_retention_s=body.retention_s(),
            priority=body.priority,
            deadline_s=body.deadline_s,
            cache_salt=body.cache_salt,
            hints=read_hints(body.nvext, body.kv_hints),
            tools_offered=bool(offered),
        )
        request, caller = server.request(served, "msg", options, ids, sampling, http, images=images)
        render = MessagesRender(served.name, shape)
        last_event_id = http.headers.get(LAST_EVENT_ID)
        if body.stream and last_event_id:
            return await server.resume(served, last_event_id, request, render)
        return await server.generate(served, request, caller, options, http, shape, render)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest, http: HTTPRequest):
        """The prompt's tokens as `create` would template them (agent clients size their context with it)."""
        served = server.models.pick(body.model)  # only its tokenizer is needed: an asleep model stays asleep
        body = await inline_message_files(body, files, http.state.caller.tenant, served, server.config.images)
        loaded = await load_images(body.image_urls(), served, server.config.images, "messages")
        conversation = body.conversation(image_token(served))
        prefill = _prefill(conversation, strict=False)
        ids, _ = conversation_prompt(conversation, body.offered_tools(), served.tokenizer, continue_final=prefill)
        ids, _ = place_images(served, ids, loaded, "messages")
        return {"input_tokens": len(ids)}
