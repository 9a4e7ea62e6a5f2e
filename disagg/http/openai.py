"""The OpenAI-compatible generation API: /v1/models, /v1/completions and /v1/chat/completions (JSON or SSE).

A streaming request is only answered with 200 once its first token exists, so a request that cannot be served
gets a real status (503, 400, ...); a failure after that is an SSE error event, and the stream ends.  A client
that disconnects cancels its request on every worker.  The request itself is served by the routing core
(`RouterCore.generate`: admission, routing, migration); this module turns HTTP into a Request and deltas into
OpenAI answers.  A request with SSE `Last-Event-ID`, or a repeated `Idempotency-Key`, is answered from the stream a
worker journaled instead of a new generation (http/resume.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest

from disagg.errors import InvalidRequest
from disagg.http.errors import error_response
from disagg.http.file_images import inline_chat_files
from disagg.http.file_store import FileStorePort
from disagg.http.images import image_token, load_images, place_images
from disagg.http.inputs import conversation_prompt, sampling_params, tokenize_prompt
from disagg.http.models import ServedModel
from disagg.http.resume import (
    IDEMPOTENCY_KEY,
    LAST_EVENT_ID,
    Cursor,
    ResumeToken,
    idempotent_request_id,
    journaled_answer,
    resume_stream,
)
from disagg.http.schemas import ChatCompletionRequest, CompletionRequest
from disagg.http.serving import CallOptions, Server
from disagg.http.shape import AnswerShape, Collected
from disagg.http.stream import ClientGone, json_answer, sse, until_disconnect
from disagg.protocol import ImageInput, Request, SamplingParams, TokenDelta


def add_openai_routes(app: FastAPI, server: Server, files: FileStorePort) -> None:
    """`files`: the uploads a chat `file` part names (the Files API's store)."""

    serve = _server(server)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": server.models.cards()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        served = await server.model(body.model, http)
        ids = tokenize_prompt(body.prompt, served.tokenizer)
        sampling = sampling_params(
            body,
            body.max_tokens if body.max_tokens is not None else SamplingParams.max_tokens,  # OpenAI's default, 16
            len(ids),
            served.max_model_len,
            logprobs=body.logprobs,
        )
        shape = AnswerShape(served.tokenizer, chat=False, logprobs=body.logprobs is not None)
        return await serve(served, "cmpl", "text_completion", body, ids, sampling, http, shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        served = await server.model(body.model, http)
        body = await inline_chat_files(body, files, http.state.caller.tenant, served, server.config.images)
        offered = body.offered_tools()
        urls = [url for m in body.messages for url in m.image_urls()]
        loaded = await load_images(urls, served, server.config.images, "messages")
        conversation = [m.for_template(image_token(served)) for m in body.messages]
        ids, tools = conversation_prompt(
            conversation,
            offered,
            served.tokenizer,
            continue_final=body.continue_final_message,
            generation_prompt=body.add_generation_prompt,
        )
        ids, images = place_images(served, ids, loaded, "messages")
        sampling = sampling_params(
            body,
            body.max_completion_tokens or body.max_tokens,
            len(ids),
            served.max_model_len,
            logprobs=body.logprobs_k(),
        )
        shape = AnswerShape(
            served.tokenizer,
            chat=True,
            logprobs=body.logprobs,
            tools=tools,
            parallel_tool_calls=body.parallel_tool_calls is not False,
        )
        return await serve(
            served, "chatcmpl", "chat.completion", body, ids, sampling, http, shape, bool(offered), images
        )


def _include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


@dataclass
class OpenAIRender:
    """Chat and completions answers: `json_answer`, or `sse` chunks ending with `[DONE]`."""

    kind: str
    model: str
    shape: AnswerShape
    include_usage: bool

    async def body(self, request: Request, answer: Collected) -> dict[str, Any]:
        n_prompt = len(request.prompt_token_ids)
        return json_answer(request.request_id, self.kind, request.created, self.model, self.shape, answer, n_prompt)

    def events(
        self, first: TokenDelta, deltas: AsyncGenerator[TokenDelta, None], request: Request, cursor: Cursor
    ) -> AsyncIterator[str]:
        n_prompt = len(request.prompt_token_ids)
        rid, created = request.request_id, request.created
        return sse(first, deltas, rid, self.model, created, self.shape, self.include_usage, n_prompt, cursor)


def _server(server: Server):
    """The handler both endpoints share: one request through the core (http/serving.py), answered as JSON or SSE -
    or, with Last-Event-ID / a repeated Idempotency-Key, the rest of a journaled one (http/resume.py)."""
    poll_s = server.config.disconnect_poll_s

    async def serve(
        served: ServedModel,
        prefix: str,
        kind: str,
        body,
        ids: list[int],
        sampling: SamplingParams,
        http: HTTPRequest,
        shape: AnswerShape,
        tools_offered: bool = False,
        images: Sequence[ImageInput] = (),
    ):
        options = CallOptions.of(body, tools_offered=tools_offered)
        key = http.headers.get(IDEMPOTENCY_KEY) if not body.stream else None
        # a non-streaming request with an Idempotency-Key gets the id of that key (http/resume.py)
        rid = idempotent_request_id(prefix, http.state.caller.tenant, key) if key else None
        request, caller = server.request(served, prefix, options, ids, sampling, http, request_id=rid, images=images)
        core, model = served.core, served.name
        last_event_id = http.headers.get(LAST_EVENT_ID)
        if body.stream and last_event_id:
            owner = server.stream_owner(served, ResumeToken.parse(last_event_id))  # where its token says
            include_usage = _include_usage(body)
            return await resume_stream(owner.core.resumer, last_event_id, request, shape, owner.name, include_usage)
        if key:
            try:
                found = await until_disconnect(journaled_answer(core.resumer, request, shape.tokenizer), http, poll_s)
            except ClientGone:
                return error_response(InvalidRequest("client closed the request", code="client_closed"))
            if found is not None:
                original, answer = found
                shape.name_calls(original.request_id)  # its tool calls named as in the first answer
                return json_answer(original.request_id, kind, original.created, model, shape, answer, len(ids))
        render = OpenAIRender(kind, model, shape, _include_usage(body))
        return await server.generate(served, request, caller, options, http, shape, render)

    return serve
