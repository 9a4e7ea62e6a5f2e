"""The OpenAI Responses API: `POST /v1/responses` (JSON or SSE), `GET` and `DELETE /v1/responses/{id}`, and
`GET /v1/responses/{id}/input_items`.

A request becomes a chat conversation (http/responses_schema.py) - after the stored one it continues when it names
`previous_response_id` - and is served like a chat completion (http/serving.py), so the same conversation gives
the same tokens through either API.  The answer is a Response object: a `message` output item with the text, then
one `function_call` item per tool call the model made.  Streaming sends the Responses event types in order:

    response.created, response.in_progress,
    [response.output_item.added, response.content_part.added, response.output_text.delta..., response.output_text.done,
     response.content_part.done, response.output_item.done]              (the message, when there is text)
    [response.output_item.added, response.function_call_arguments.delta, response.function_call_arguments.done,
     response.output_item.done]...                                        (each function call)
    response.completed | response.incomplete (max_output_tokens reached)

each as `event: <type>` with a `sequence_number`; a failure after the headers went out is an `error` event and
`response.failed`.  With `store` (the default), the finished response is kept (http/response_store.py) for
`previous_response_id` and GET: per tenant, bounded, with a TTL.  An `input_image` may name an upload by
`file_id` (http/files.py).  A follow-up turn continues the first turn's
session, so it is routed to the worker that holds the conversation's KV.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query
from fastapi import Request as HTTPRequest

from disagg.errors import DisaggError, InvalidRequest
from disagg.http.errors import error_body, unexpected
from disagg.http.file_images import inline_files
from disagg.http.file_store import FileStorePort
from disagg.http.images import image_token, load_images, place_images
from disagg.http.inputs import check_tool_results, conversation_prompt, sampling_params
from disagg.http.response_store import ResponseStorePort, StoredResponse
from disagg.http.responses_schema import ResponsesRequest, items_to_messages
from disagg.http.resume import LAST_EVENT_ID, Cursor, ResumeToken, TypedEvents
from disagg.http.serving import CallOptions, Server
from disagg.http.shape import AnswerShape, Collected
from disagg.http.stream import with_first
from disagg.protocol import FinishReason, Request, TokenDelta

MAX_OUTPUT = "max_output_tokens"
IN_PROGRESS, COMPLETED = "in_progress", "completed"
MAX_LISTED = 100  # input_items' largest page (OpenAI's)


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """A message output item; `text` None: the item as it is announced, before its content part is added."""
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(call: dict[str, Any], item_id: str, status: str, arguments: str | None = None) -> dict[str, Any]:
    function = call["function"]
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call["id"],
        "name": function["name"],
        "arguments": function["arguments"] if arguments is None else arguments,
        "status": status,
    }


@dataclass
class ResponsesRender:
    """One request's Response object and events; `on_done` gets the finished answer (the assistant message in
    chat form, and the Response object)."""

    body_in: ResponsesRequest
    model: str
    shape: AnswerShape
    on_done: Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]  # (assistant chat message, Response)
    response_id: str = field(default_factory=lambda: _item_id("resp"))
    created_at: int = 0

    def response(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None, error: dict | None = None
    ) -> dict[str, Any]:
        b = self.body_in
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": MAX_OUTPUT} if status == "incomplete" else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id,
            "store": b.store,
            "temperature": b.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": b.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in b.tools or ()],
            "top_p": b.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": b.user,
            "metadata": b.metadata or {},
        }

    def item_id(self, kind: str, index: int = 0) -> str:
        """An output item's id, made from the response's: a resumed stream (http/resume.py) names the same items."""
        return f"{kind}_{self.response_id.removeprefix('resp_')}_{index}"

    @staticmethod
    def usage(n_prompt: int, n_out: int, cached: int) -> dict[str, Any]:
        return {
            "input_tokens": n_prompt,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": n_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_prompt + n_out,
        }

    async def _finish(self, message: dict[str, Any], output: list, usage: dict, length: bool) -> dict[str, Any]:
        body = self.response("incomplete" if length else COMPLETED, output, usage)
        await self.on_done(message, body)
        return body

    async def body(self, request: Request, answer: Collected) -> dict[str, Any]:
        self.created_at = request.created
        choice = self.shape.final_choice(answer)
        message = choice["message"]
        output = [_message_item(self.item_id("msg"), message["content"], "completed")] if message["content"] else []
        for call in message.get("tool_calls") or ():
            output.append(_call_item(call, self.item_id("fc", len(output)), "completed"))
        usage = self.usage(len(request.prompt_token_ids), answer.num_tokens, answer.num_cached_tokens)
        return await self._finish(message, output, usage, answer.finish_reason == FinishReason.LENGTH)

    async def events(
        self,
        first: TokenDelta,
        deltas: AsyncGenerator[TokenDelta, None],
        request: Request,
        cursor: Cursor,
        after: ResumeToken | None = None,
    ) -> AsyncIterator[str]:
        """The stream's events, numbered, each with its `id:`; `after`: a resumed stream's Last-Event-ID (events up
        to it come back empty: http/resume.py)."""
        self.created_at = request.created
        sse = _Events(TypedEvents(cursor, after))
        msg_id, text = self.item_id("msg"), ""
        calls: list[dict[str, Any]] = []
        output: list[dict[str, Any]] = []
        n_out, reason = 0, None
        at = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        yield sse("response.created", response=self.response("in_progress", [], None))
        yield sse("response.in_progress", response=self.response("in_progress", [], None))
        try:
            async for delta in with_first(first, deltas):
                n_out += len(delta.token_ids)
                cursor.advance(len(delta.token_ids))
                choice = self.shape.stream_choice(delta)
                if choice is None:
                    continue
                piece = choice["delta"].get("content") or ""
                if piece and not text:
                    announced = _message_item(msg_id, None, IN_PROGRESS)
                    yield sse("response.output_item.added", output_index=0, item=announced)
                    part = {"type": "output_text", "text": "", "annotations": []}
                    yield sse("response.content_part.added", **at, part=part)
                if piece:
                    text += piece
                    yield sse("response.output_text.delta", **at, delta=piece, logprobs=[])
                calls += choice["delta"].get("tool_calls") or []
                reason = choice["finish_reason"] or reason
            if text:
                item = _message_item(msg_id, text, COMPLETED)
                yield sse("response.output_text.done", **at, text=text, logprobs=[])
                yield sse("response.content_part.done", **at, part=item["content"][0])
                yield sse("response.output_item.done", output_index=0, item=item)
                output.append(item)
            for call in calls:
                for event in _call_events(sse, call, output, self.item_id("fc", len(output))):
                    yield event
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                message["tool_calls"] = [{k: c[k] for k in ("id", "type", "function")} for c in calls]
            usage = self.usage(len(request.prompt_token_ids), n_out, first.num_cached_tokens)
            length = reason == FinishReason.LENGTH
            body = await self._finish(message, output, usage, length)
            yield sse("response.incomplete" if length else "response.completed", response=body)
        except Exception as exc:  # never a silently cut stream
            err = error_body(exc if isinstance(exc, DisaggError) else unexpected(exc))["error"]
            yield sse("error", code=err["code"], message=err["message"], param=err["param"])
            error = {"code": err["code"] or "server_error", "message": err["message"]}
            yield sse("response.failed", response=self.response("failed", output, None, error))
        finally:
            await deltas.aclose()


class _Events:
    """SSE events of one response, numbered in order (`sequence_number`), each with its `id:`."""

    def __init__(self, typed: TypedEvents) -> None:
        self.seq, self.typed = 0, typed

    def __call__(self, type_: str, **fields: Any) -> str:
        self.seq += 1
        return self.typed(type_, {"sequence_number": self.seq - 1, **fields})


def _call_events(sse: _Events, call: dict[str, Any], output: list[dict[str, Any]], item_id: str) -> list[str]:
    """The events of one function call item (its arguments in one delta: they are parsed whole), appended to
    `output`."""
    index, item = len(output), _call_item(call, item_id, IN_PROGRESS, arguments="")
    ids = {"item_id": item["id"], "output_index": index}
    arguments = call["function"]["arguments"]
    done = {**item, "arguments": arguments, "status": COMPLETED}
    output.append(done)
    return [
        sse("response.output_item.added", output_index=index, item=item),
        sse("response.function_call_arguments.delta", **ids, delta=arguments),
        sse("response.function_call_arguments.done", **ids, arguments=arguments),
        sse("response.output_item.done", output_index=index, item=done),
    ]


def _unique_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Item ids as listed: a client's repeated id gets a fresh one, so `after` names one place."""
    seen: set[str] = set()
    for item in items:
        if item["id"] in seen:
            item["id"] = f"item_{uuid.uuid4().hex}"
        seen.add(item["id"])
    return items


def _session(body: ResponsesRequest, previous: StoredResponse | None, response_id: str) -> str | None:
    """The conversation is the session (a follow-up continues its first response's); `prompt_cache_key` names
    one; a response that is not stored starts none of its own (nothing can continue it, so nothing is pinned for
    it) - the body's `user` or the X-Session-ID header still name one, as on every OpenAI endpoint
    (http/serving.py)."""
    if previous is not None:
        return previous.session
    if body.prompt_cache_key:
        return body.prompt_cache_key
    return response_id if body.store else None


async def _forget(message: dict[str, Any], response: dict[str, Any]) -> None:
    """`store: false`: nothing kept."""


def add_responses_routes(app: FastAPI, server: Server, store: ResponseStorePort, files: FileStorePort) -> None:
    @app.post("/v1/responses")
    async def create(body: ResponsesRequest, http: HTTPRequest):
        served = await server.model(body.model)
        tokenizer = served.tokenizer
        tenant = http.state.caller.tenant
        previous = await store.get(tenant, body.previous_response_id) if body.previous_response_id else None
        history = previous.messages() if previous is not None else []
        token = image_token(served)
        earlier = sum(len(m.get("images", ())) for m in history)
        items = await inline_files(body.items(), files, tenant, served, server.config.images, earlier=earlier)
        turn = items_to_messages(items, token)
        check_tool_results(history + turn, "input", "function_call_output call_id", "function_call")
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        offered = body.offered_tools()
        urls = [url for m in history + turn for url in m.get("images", ())]  # a stored turn's images too
        loaded = await load_images(urls, served, server.config.images, "input")
        ids, tools = conversation_prompt(system + history + turn, offered, tokenizer, param="input")
        ids, images = place_images(served, ids, loaded, "input")
        sampling = sampling_params(
            body, body.max_output_tokens, len(ids), served.max_model_len, max_tokens_param="max_output_tokens"
        )
        parallel = body.parallel_tool_calls is not False
        shape = AnswerShape(tokenizer, chat=True, tools=tools, parallel_tool_calls=parallel)
        render = ResponsesRender(body, served.name, shape, on_done=_forget)
        last_event_id = http.headers.get(LAST_EVENT_ID) if body.stream else None
        if last_event_id:  # a resumed stream: the same response (its id is the stream's request id)
            render.response_id = ResumeToken.parse(last_event_id).request_id
        session = _session(body, previous, render.response_id)
        options = CallOptions.of(body, session=session, tools_offered=bool(offered))
        request, caller = server.request(
            served, "resp", options, ids, sampling, http, request_id=render.response_id, images=images
        )
        if body.store:

            async def keep(message: dict[str, Any], response: dict[str, Any]) -> None:
                session = request.session_id or render.response_id  # what this turn was routed and pinned by
                listed = _unique_ids([item.listed() for item in body.items()])
                stored = StoredResponse.of(render.response_id, session, history + turn + [message], response, listed)
                await store.put(tenant, stored)

            render.on_done = keep
        if last_event_id:
            return await server.resume(served, last_event_id, request, render)
        return await server.generate(served, request, caller, options, http, shape, render)

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, http: HTTPRequest):
        return (await store.get(http.state.caller.tenant, response_id, "response_id")).body()

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(
        response_id: str,
        http: HTTPRequest,
        order: Literal["asc", "desc"] = "desc",
        limit: Annotated[int, Query(ge=1, le=MAX_LISTED)] = 20,
        after: str = "",
    ):
        """The items this response was given (OpenAI's listing: newest first by default, `limit` 1-100, `after`
        an item id)."""
        items = (await store.get(http.state.caller.tenant, response_id, "response_id")).input_items()
        items = items[::-1] if order == "desc" else items
        ids = [item["id"] for item in items]
        if after and after not in ids:
            raise InvalidRequest(f"after: no input item {after!r} in response {response_id!r}", param="after")
        start = ids.index(after) + 1 if after else 0
        page = items[start : start + limit]
        more = start + len(page) < len(items)
        first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
        return {"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": more}

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, http: HTTPRequest):
        await store.delete(http.state.caller.tenant, response_id)
        return {"id": response_id, "object": "response", "deleted": True}
