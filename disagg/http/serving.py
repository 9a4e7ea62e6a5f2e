"""One generation call through the routing core, shared by every API (chat, completions, responses, messages).

Each API reads its body into a prompt, SamplingParams and `CallOptions`, and says how to answer (`Render`: a
whole JSON body, or SSE events).  `Server.generate` does the rest the same way for all of them: the caller's
tenant salts the cache and scopes the session, the priority is checked against the key (a hinted one is capped
instead), the request waits in admission and streams from its workers.  A streaming request is only answered 200
once its first token exists, so a request that cannot be served gets a real status; a client that hangs up
cancels its request everywhere.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from disagg.errors import InvalidRequest, ServiceUnavailable
from disagg.http.config import ApiConfig
from disagg.http.errors import dialect_of, error_response
from disagg.http.hints import Hints, read_hints
from disagg.http.idle import ModelIdler
from disagg.http.inputs import PRIORITY_HEADER, priority_of
from disagg.http.keys import Caller, check_priority
from disagg.http.models import ModelTable, ServedModel
from disagg.http.resume import IDEMPOTENCY_KEY, Cursor, EventRender, ResumeToken, resume_events
from disagg.http.schemas import KVRetention
from disagg.http.shape import AnswerShape, Collected
from disagg.http.stream import (
    ClientGone,
    Running,
    collect,
    request_span,
    timed,
    until_disconnect,
    without_trace_context,
)
from disagg.isolation import model_salted, scoped_tenant
from disagg.protocol import ImageInput, Request, SamplingParams, TokenDelta
from disagg.router.decision import Decision
from disagg.telemetry import RouterMetrics

SESSION_HEADER = "x-session-id"


class OpenAIBody(Protocol):
    """What `CallOptions.of` reads of an OpenAI body: chat, completions (schemas.py) and responses bodies."""

    stream: bool
    user: str | None
    kv_retention: KVRetention | None
    priority: int | None
    deadline_s: float | None
    cache_salt: str | None
    nvext: Any
    kv_hints: Any
    prompt_cache_key: str | None

    def cache_retention_s(self) -> float | None: ...


@dataclass
class CallOptions:
    """What a call asks of the core besides its prompt and sampling."""

    stream: bool
    session: str | None = None  # the body's session (chat: `user`); the X-Session-ID header wins
    kv_retention_s: float | None = None
    priority: int | None = None  # the body's; None: the X-Priority header, else a hinted one, else 0
    deadline_s: float | None = None
    cache_salt: str | None = None
    hints: Hints = dataclasses.field(default_factory=Hints)
    tools_offered: bool = False  # an agent turn: with a session, its KV is kept (AgentConfig)

    @classmethod
    def of(cls, body: OpenAIBody, session: str | None = None, tools_offered: bool = False) -> CallOptions:
        """From an OpenAI body (chat, completions, responses: http/schemas.py's Extensions and PromptCache)."""
        return cls(
            tools_offered=tools_offered,
            stream=body.stream,
            session=session or body.user or body.prompt_cache_key,
            kv_retention_s=body.kv_retention.ttl_s if body.kv_retention is not None else body.cache_retention_s(),
            priority=body.priority,
            deadline_s=body.deadline_s,
            cache_salt=body.cache_salt,
            hints=read_hints(body.nvext, body.kv_hints),
        )


class Render(Protocol):
    """How one API answers a request: a whole JSON body, or its SSE events (the first delta is already here).
    `cursor` names where a stream stands for its events' `id:` lines (resumable with Last-Event-ID: http/resume.py)."""

    async def body(self, request: Request, answer: Collected) -> dict[str, Any]: ...

    def events(
        self, first: TokenDelta, deltas: AsyncGenerator[TokenDelta, None], request: Request, cursor: Cursor
    ) -> AsyncIterator[str]: ...


def _priority(options: CallOptions, headers: Mapping[str, str], caller: Caller) -> int:
    """An asked-for priority above the key's cap is refused (403); a hinted one is capped: hints never fail."""
    if options.priority is None and headers.get(PRIORITY_HEADER) is None and options.hints.priority is not None:
        return options.hints.capped_priority(caller.max_priority) or 0
    priority = priority_of(options.priority, headers)
    check_priority(caller, priority)
    return priority


def _client_closed(http: HTTPRequest) -> JSONResponse:
    closed = InvalidRequest("client closed the request", code="client_closed")
    return error_response(closed, dialect=dialect_of(http.url.path, http.headers))


class Server:
    def __init__(self, models: ModelTable, config: ApiConfig, metrics: RouterMetrics, idle: ModelIdler) -> None:
        self.models, self.config, self.metrics, self.idle = models, config, metrics, idle

    async def model(self, name: str, http: HTTPRequest | None = None) -> ServedModel:
        """The served model a body's `model` names (404 model_not_found otherwise), once it takes requests (an
        asleep model wakes first when configured: http/idle.py); a request with an Idempotency-Key draws an
        alias's target by its key, so every repeat reaches the model that answered it."""
        key = http.headers.get(IDEMPOTENCY_KEY) if http is not None else None
        model = self.models.pick(name, f"{http.state.caller.tenant}\x00{key}" if http is not None and key else None)
        await self.idle.ready(model)
        self.models.check(model)
        return model

    def stream_owner(self, served: ServedModel, token: ResumeToken) -> ServedModel:
        """The model whose worker a resume token names: an alias may have drawn another model than `served` for the
        stream's request."""
        return self.models.model_of_worker(token.worker) or served

    async def resume(
        self, served: ServedModel, last_event_id: str, request: Request, render: EventRender
    ) -> StreamingResponse:
        """A Responses or Messages stream resumed after the event its Last-Event-ID names (http/resume.py)."""
        token = ResumeToken.parse(last_event_id)
        owner = self.stream_owner(served, token)
        return await resume_events(owner.core.resumer, token, request, render, served.tokenizer)

    def request(
        self,
        served: ServedModel,
        prefix: str,
        options: CallOptions,
        ids: list[int],
        sampling: SamplingParams,
        http: HTTPRequest,
        request_id: str | None = None,
        images: Sequence[ImageInput] = (),
    ) -> tuple[Request, Caller]:
        """The core's Request for one call, and its caller (http/auth.py admitted it); `images`: the prompt's
        (their placeholder ids are in `ids`)."""
        caller: Caller = http.state.caller
        hints = options.hints
        for hint in hints.ignored:
            self.metrics.ignored_hints.labels(hint.value).inc()
        if hints.greedy:
            sampling = dataclasses.replace(sampling, temperature=0.0)
        session = http.headers.get(SESSION_HEADER) or options.session
        request = Request(
            request_id or f"{prefix}-{uuid.uuid4().hex}",
            ids,
            sampling,
            session_id=session,
            kv_retention_s=options.kv_retention_s or hints.retention_s or self._agent_retention(options, session),
            priority=_priority(options, http.headers, caller),
            # no hit crosses tenants, nor models
            cache_salt=model_salted(
                served.namespace, self.config.isolation.cache_salt(caller.tenant, options.cache_salt)
            ),
            tenant=scoped_tenant(caller.tenant),  # nor does a session id
            created=int(time.time()),
            expected_output_tokens=hints.expected_output_tokens,
            queue_head_start_s=hints.latency_sensitivity_s,
            lora=served.lora,
            images=list(images),
        )
        return request, caller

    def _agent_retention(self, options: CallOptions, session: str | None) -> float | None:
        """A session's agent turn keeps its KV by default: whether it ends in a tool call is not known until it
        ends, and the tool's wait is where plain LRU would lose it."""
        ttl = self.config.agents.tool_turn_retention_s
        return ttl if options.tools_offered and session and ttl > 0 else None

    async def generate(
        self,
        served: ServedModel,
        request: Request,
        caller: Caller,
        options: CallOptions,
        http: HTTPRequest,
        shape: AnswerShape,
        render: Render,
    ):
        """Serve `request`: a StreamingResponse of `render`'s events, or its JSON body."""
        core, metrics, poll_s = served.core, self.metrics, self.config.disconnect_poll_s
        shape.name_calls(request.request_id)
        if served.encode is not None and request.images:  # E/PD: an encoder worker's rows, or left colocated
            encoded = await served.encode.attach(request)
            metrics.images.labels(encoded.value).inc(len(request.images))
        n_prompt = len(request.prompt_token_ids)
        running, cursor = Running(served.name), Cursor(request.request_id)
        trace_headers = http.headers if caller.may_force_trace else without_trace_context(http.headers)  # see there
        span = request_span(
            core.tracer,
            served.name,
            shape.chat,
            options.stream,
            request,
            request.sampling,
            trace_headers,
            request.session_id,
        )

        def on_route(decision: Decision) -> None:  # left the admission queue (or migrated): now it runs there
            cursor.worker = decision.decode_worker  # the next events name the worker their tokens come from
            metrics.on_route(decision)
            if not running.counted:
                running.counted = True
                running.predicted = decision.predicted_cached_tokens(n_prompt, core.block_size)
                metrics.running.labels(served.name).inc()

        deltas = core.generate(
            request,
            session=request.session_id,
            on_route=on_route,
            tenant=caller.tenant,
            priority=request.priority,
            deadline_s=options.deadline_s,
            span=span,
        )
        stream = timed(deltas, n_prompt, running, span, metrics)
        try:
            first = await until_disconnect(stream.__anext__(), http, poll_s)
        except ClientGone:
            await stream.aclose()
            return _client_closed(http)
        except StopAsyncIteration:
            raise ServiceUnavailable("the request ended without output", code="empty_stream") from None
        except BaseException:
            await stream.aclose()
            raise
        if options.stream:
            return StreamingResponse(render.events(first, stream, request, cursor), media_type="text/event-stream")
        try:
            answer = await until_disconnect(collect(first, stream), http, poll_s)
        except ClientGone:
            await stream.aclose()
            return _client_closed(http)
        return await render.body(request, answer)
