"""The OpenAI-compatible generation API: /v1/models, /v1/completions and /v1/chat/completions (JSON or SSE).

A streaming request is only answered with 200 once its first token exists, so a request that cannot be served
gets a real status (503, 400, ...); a failure after that is an SSE error event, and the stream ends.  A client
that disconnects cancels its request on every worker.  The request itself is served by the routing core
(`RouterCore.generate`: admission, routing, migration); this module turns HTTP into a Request and deltas into
OpenAI answers.  A request with SSE `Last-Event-ID`, or a repeated `Idempotency-Key`, is answered from the stream a
worker journaled instead of a new generation (http/resume.py).
"""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from disagg.engine.tokenizer import Tokenizer
from disagg.errors import InvalidRequest, ServiceUnavailable
from disagg.http.config import ApiConfig
from disagg.http.errors import error_response
from disagg.http.inputs import chat_prompt, check_model, priority_of, sampling_params, tokenize_prompt
from disagg.http.keys import Caller, check_priority
from disagg.http.resume import (
    IDEMPOTENCY_KEY,
    LAST_EVENT_ID,
    Cursor,
    idempotent_request_id,
    journaled_answer,
    resume_stream,
)
from disagg.http.schemas import ChatCompletionRequest, CompletionRequest
from disagg.http.shape import AnswerShape
from disagg.http.stream import (
    ClientGone,
    Running,
    collect,
    json_answer,
    request_span,
    sse,
    timed,
    until_disconnect,
    without_trace_context,
)
from disagg.isolation import scoped_tenant
from disagg.protocol import Request, SamplingParams
from disagg.router.policy import Decision
from disagg.router.router import RouterCore
from disagg.telemetry import RouterMetrics

SESSION_HEADER = "x-session-id"


def add_openai_routes(
    app: FastAPI, core: RouterCore, tokenizer: Tokenizer, config: ApiConfig, metrics: RouterMetrics
) -> None:
    serve = _server(core, config, metrics)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "disagg",
                    "max_model_len": config.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model, config.model_name)
        ids = tokenize_prompt(body.prompt, tokenizer)
        sampling = sampling_params(
            body,
            body.max_tokens if body.max_tokens is not None else SamplingParams.max_tokens,  # OpenAI's default, 16
            len(ids),
            config.max_model_len,
            logprobs=body.logprobs,
        )
        shape = AnswerShape(tokenizer, chat=False, logprobs=body.logprobs is not None)
        return await serve("cmpl", "text_completion", body, ids, sampling, http, shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        check_model(body.model, config.model_name)
        ids, tools = chat_prompt(body, tokenizer)
        sampling = sampling_params(
            body,
            body.max_completion_tokens or body.max_tokens,
            len(ids),
            config.max_model_len,
            logprobs=body.logprobs_k(),
        )
        shape = AnswerShape(
            tokenizer,
            chat=True,
            logprobs=body.logprobs,
            tools=tools,
            parallel_tool_calls=body.parallel_tool_calls is not False,
        )
        return await serve("chatcmpl", "chat.completion", body, ids, sampling, http, shape)


def _request(
    prefix: str, body, ids: list[int], sampling: SamplingParams, http: HTTPRequest, config: ApiConfig
) -> tuple[Request, Caller]:
    """The core's Request for one call, and its caller (http/auth.py admitted it): the caller's tenant salts the
    request's cache and scopes its session; a priority above the caller's cap is refused (403).  A non-streaming
    request with an Idempotency-Key gets the id of that key (http/resume.py)."""
    caller: Caller = http.state.caller
    priority = priority_of(body, http.headers)
    check_priority(caller, priority)
    key = http.headers.get(IDEMPOTENCY_KEY) if not body.stream else None
    request = Request(
        idempotent_request_id(prefix, caller.tenant, key) if key else f"{prefix}-{uuid.uuid4().hex}",
        ids,
        sampling,
        session_id=http.headers.get(SESSION_HEADER) or body.user,
        kv_retention_s=body.kv_retention.ttl_s if body.kv_retention is not None else None,
        priority=priority,
        cache_salt=config.isolation.cache_salt(caller.tenant, body.cache_salt),  # no hit crosses tenants
        tenant=scoped_tenant(caller.tenant),  # nor does a session id
        created=int(time.time()),
    )
    return request, caller


def _include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _server(core: RouterCore, config: ApiConfig, metrics: RouterMetrics):
    """The handler both generation endpoints share: one request through the core, answered as JSON or SSE - or,
    with Last-Event-ID / a repeated Idempotency-Key, the rest of a journaled one (http/resume.py)."""
    model, poll_s = config.model_name, config.disconnect_poll_s

    async def serve(
        prefix: str, kind: str, body, ids: list[int], sampling: SamplingParams, http: HTTPRequest, shape: AnswerShape
    ):
        request, caller = _request(prefix, body, ids, sampling, http, config)
        last_event_id = http.headers.get(LAST_EVENT_ID)
        if body.stream and last_event_id:
            return await resume_stream(core.resumer, last_event_id, request, shape, model, _include_usage(body))
        if not body.stream and http.headers.get(IDEMPOTENCY_KEY):
            try:
                found = await until_disconnect(journaled_answer(core.resumer, request, shape.tokenizer), http, poll_s)
            except ClientGone:
                return error_response(InvalidRequest("client closed the request", code="client_closed"))
            if found is not None:
                original, answer = found
                return json_answer(original.request_id, kind, original.created, model, shape, answer, len(ids))
        return await generate(request, caller, kind, body, ids, sampling, http, shape)

    async def generate(
        request: Request,
        caller: Caller,
        kind: str,
        body,
        ids: list[int],
        sampling: SamplingParams,
        http: HTTPRequest,
        shape: AnswerShape,
    ):
        session, priority, tenant = request.session_id, request.priority, caller.tenant
        running, cursor = Running(), Cursor(request.request_id)
        trace_headers = http.headers if caller.may_force_trace else without_trace_context(http.headers)  # see there
        span = request_span(
            core.tracer, model, shape.chat, bool(body.stream), request, sampling, trace_headers, session
        )

        def on_route(decision: Decision) -> None:  # left the admission queue (or migrated): now it runs there
            cursor.worker = decision.decode_worker  # the next events name the worker their tokens come from
            metrics.on_route(decision)
            if not running.counted:
                running.counted = True
                running.predicted = decision.predicted_cached_tokens(len(ids), core.block_size)
                metrics.running.inc()

        deltas = core.generate(
            request,
            session=session,
            on_route=on_route,
            tenant=tenant,
            priority=priority,
            deadline_s=body.deadline_s,
            span=span,
        )
        stream = timed(deltas, len(ids), running, span, metrics)
        try:
            first = await until_disconnect(stream.__anext__(), http, poll_s)
        except ClientGone:
            await stream.aclose()
            return error_response(InvalidRequest("client closed the request", code="client_closed"))
        except StopAsyncIteration:
            raise ServiceUnavailable("the request ended without output", code="empty_stream") from None
        except BaseException:
            await stream.aclose()
            raise
        rid, created = request.request_id, request.created
        if body.stream:
            events = sse(first, stream, rid, model, created, shape, _include_usage(body), len(ids), cursor)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            answer = await until_disconnect(collect(first, stream), http, poll_s)
        except ClientGone:
            await stream.aclose()
            return error_response(InvalidRequest("client closed the request", code="client_closed"))
        return json_answer(rid, kind, created, model, shape, answer, len(ids))

    return serve
