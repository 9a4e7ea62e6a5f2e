"""OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions (SSE), /v1/models, probes
(/livez, /readyz, /health) and /metrics.

Errors are OpenAI-shaped (router/http_errors.py maps the project's error classes to statuses in one place); an
unexpected exception is a JSON 500, never a plain-text one.  A streaming request is only answered with 200 once
its first token exists, so a request that cannot be served gets a real status (503, 400, ...); a failure after
that is an SSE error event, and the stream ends.  A client that disconnects cancels its request on every worker.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from opentelemetry import trace

from disagg import tracing as tr
from disagg.engine.tokenizer import Tokenizer
from disagg.errors import DisaggError, InvalidRequest, NotFound, ServiceUnavailable, Unauthorized
from disagg.protocol import Request, SamplingParams, TokenDelta
from disagg.router.http_errors import error_response, sse_error, unexpected
from disagg.router.router import RouterCore
from disagg.router.schemas import ChatCompletionRequest, CompletionRequest
from disagg.telemetry import RouterMetrics

SESSION_HEADER = "x-session-id"
TENANT_HEADER = "x-tenant-id"
PRIORITY_HEADER = "x-priority"


@dataclass
class ApiConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None  # one key for everyone (tenant "default")
    api_keys: dict[str, str] | None = None  # key -> tenant name
    disconnect_poll_s: float = 0.25

    def tenant_of(self, authorization: str, tenant_header: str | None) -> str | None:
        """The caller's tenant, or None if the key is wrong. Without configured keys the X-Tenant-ID header
        (or "default") names it."""
        key = authorization[7:] if authorization.startswith("Bearer ") else None
        if self.api_keys:
            return self.api_keys.get(key or "")
        if self.api_key:
            return "default" if key == self.api_key else None
        return tenant_header or "default"


class _ClientGone(Exception):
    pass


def build_app(core: RouterCore, tokenizer: Tokenizer, config: ApiConfig) -> FastAPI:
    tracer = core.tracer
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        core.admission.start()
        if core.supervisor is not None:
            core.supervisor.start()
        yield
        if core.supervisor is not None:
            await core.supervisor.stop()
        await core.admission.stop()
        await core.drain_releases()

    app = FastAPI(title="disagg", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = RouterMetrics(core)
    core.on_queue_wait = metrics.queue_wait.observe
    app.state.metrics = metrics

    @app.exception_handler(DisaggError)
    async def _disagg_error(_: HTTPRequest, exc: DisaggError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: HTTPRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(InvalidRequest("request body is not valid JSON", code="invalid_json"))
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return error_response(InvalidRequest(message, param=".".join(loc) or None, code=first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(NotFound(str(exc.detail)))
        if exc.status_code < 500:  # e.g. 405 method not allowed: keep the status, OpenAI-shaped body
            body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                              "code": None}}
            return JSONResponse(status_code=exc.status_code, content=body)
        return error_response(unexpected(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: HTTPRequest, exc: Exception):
        return error_response(unexpected(exc))

    app.add_middleware(_AuthAndCount, config=config, metrics=metrics)

    # ------------------------------------------------------------------ probes
    def _status() -> dict[str, Any]:
        workers = {n: {"role": w.role.value, "state": w.state.value, "reason": w.reason, "restarts": w.restarts}
                   for n, w in core.health.workers.items()}
        live = core.health.live_counts()
        return {"live": live, "decode_workers": live["decode"] + live["both"], "prefill_workers": live["prefill"],
                "workers": workers}

    @app.get("/livez")
    async def livez():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not core.health.any_decoder_ready():
            return error_response(ServiceUnavailable("no decode worker is alive", code="no_workers"))
        return {"status": "ready"}

    @app.get("/health")
    async def health():
        status = _status()
        if not core.health.any_decoder_ready():
            return error_response(ServiceUnavailable("no decode worker is alive", code="no_workers"),
                                  extra={"status": "unavailable", **status})
        return {"status": "ok", **status}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "disagg", "max_model_len": config.max_model_len}]}

    # ------------------------------------------------------------------ validation
    def _check_model(name: str) -> None:
        if name != config.model_name:
            raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def _sampling(body, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        if prompt_len >= config.max_model_len:
            raise InvalidRequest(f"This model's maximum context length is {config.max_model_len} tokens. However, "
                                 f"your prompt has {prompt_len} tokens.", param="prompt",
                                 code="context_length_exceeded")
        room = config.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise InvalidRequest(f"max_tokens={max_tokens} is too large: the prompt has {prompt_len} tokens and "
                                 f"the context holds {config.max_model_len}.", param="max_tokens",
                                 code="context_length_exceeded")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, seed=body.seed, stop=body.stop_list(), ignore_eos=body.ignore_eos)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc

    def _tokenize_prompt(prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise InvalidRequest("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt is empty", param="prompt")
            return tokenizer.encode(prompt)
        if any(t < 0 or t >= tokenizer.vocab_size for t in prompt):
            raise InvalidRequest(f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        return list(prompt)

    # ------------------------------------------------------------------ generation endpoints
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        _check_model(body.model)
        ids = _tokenize_prompt(body.prompt)
        sampling = _sampling(body, body.max_tokens if body.max_tokens is not None else 16, len(ids))
        return await _serve("cmpl", "text_completion", body, ids, sampling, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        _check_model(body.model)
        try:
            ids = tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        sampling = _sampling(body, body.max_completion_tokens or body.max_tokens, len(ids))
        return await _serve("chatcmpl", "chat.completion", body, ids, sampling, http, chat=True)

    async def _serve(prefix: str, kind: str, body, ids: list[int], sampling: SamplingParams, http: HTTPRequest,
                     chat: bool):
        session = http.headers.get(SESSION_HEADER) or body.user
        retention = body.kv_retention.ttl_s if body.kv_retention is not None else None
        priority = _priority(body, http)
        request = Request(f"{prefix}-{uuid.uuid4().hex}", ids, sampling, session_id=session,
                          kv_retention_s=retention, priority=priority)
        created = int(time.time())
        tenant = getattr(http.state, "tenant", "default")
        running = {"counted": False, "predicted": None}
        span = _request_span(chat, body, request, sampling, http, session)

        def on_route(decision) -> None:  # left the admission queue: now it runs
            metrics.on_route(decision)
            if not running["counted"]:
                running["counted"] = True
                running["predicted"] = decision.predicted_cached_tokens(len(ids), core.block_size)
                metrics.running.inc()
        stream = _timed(core.generate(request, session=session, on_route=on_route, tenant=tenant,
                                      priority=priority, deadline_s=body.deadline_s, span=span), len(ids), running,
                        span)
        try:
            first = await _until_disconnect(stream.__anext__(), http)
        except _ClientGone:
            await stream.aclose()
            return error_response(InvalidRequest("client closed the request", code="client_closed"))
        except StopAsyncIteration:
            raise ServiceUnavailable("the request ended without output", code="empty_stream") from None
        except BaseException:
            await stream.aclose()
            raise
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(first, stream, request.request_id, kind, created, chat, usage, len(ids)),
                                     media_type="text/event-stream")
        try:
            text, n_out, reason, cached = await _until_disconnect(_collect(first, stream), http)
        except _ClientGone:
            await stream.aclose()
            return error_response(InvalidRequest("client closed the request", code="client_closed"))
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": request.request_id, "object": kind, "created": created, "model": config.model_name,
                "choices": [choice], "usage": _usage(len(ids), n_out, cached)}

    def _priority(body, http: HTTPRequest) -> int:
        if body.priority is not None:
            return body.priority
        header = http.headers.get(PRIORITY_HEADER)
        if header is None:
            return 0
        try:
            value = int(header)
        except ValueError:
            raise InvalidRequest(f"{PRIORITY_HEADER} must be an integer", param="priority") from None
        if not -100 <= value <= 100:
            raise InvalidRequest(f"{PRIORITY_HEADER} must be in [-100, 100]", param="priority")
        return value

    async def _until_disconnect(awaitable, http: HTTPRequest):
        """Await `awaitable`; if the client hangs up meanwhile, cancel it and raise _ClientGone."""
        task = asyncio.ensure_future(awaitable)
        while not task.done():
            await asyncio.wait({task}, timeout=config.disconnect_poll_s)
            if not task.done() and await http.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise _ClientGone()
        return task.result()

    def _request_span(chat: bool, body, request: Request, sampling: SamplingParams, http: HTTPRequest,
                      session: str | None) -> trace.Span:
        """The request's span (SERVER), continuing the client's trace when it sent a traceparent."""
        operation = "chat" if chat else "text_completion"
        attributes = {tr.OPERATION: operation, tr.PROVIDER_NAME: tr.PROVIDER, tr.REQUEST_MODEL: config.model_name,
                      tr.REQUEST_MAX_TOKENS: sampling.max_tokens, tr.REQUEST_TEMPERATURE: sampling.temperature,
                      tr.REQUEST_TOP_P: sampling.top_p, tr.REQUEST_STREAM: bool(body.stream),
                      tr.RESPONSE_ID: request.request_id, tr.USAGE_INPUT_TOKENS: len(request.prompt_token_ids)}
        if sampling.seed is not None:
            attributes[tr.REQUEST_SEED] = sampling.seed
        if session:
            attributes[tr.CONVERSATION_ID] = session
        return tracer.start_span(f"{operation} {config.model_name}", context=tr.extract(dict(http.headers)),
                                 kind=trace.SpanKind.SERVER, attributes=attributes)

    async def _timed(deltas: AsyncIterator[TokenDelta], n_prompt: int, running: dict[str, Any],
                     span: trace.Span) -> AsyncIterator[TokenDelta]:
        start = last = time.monotonic()
        first = True
        n_out, reasons = 0, []
        metrics.prompt_tokens.inc(n_prompt)
        try:
            async for delta in deltas:
                now = time.monotonic()
                if first:
                    metrics.ttft.observe(now - start)
                    metrics.prefix_cache_queries.inc(n_prompt)
                    metrics.prefix_cache_hits.inc(delta.num_cached_tokens)
                    if running["predicted"] is not None:
                        metrics.staleness.observe(running["predicted"] - delta.num_cached_tokens)
                    span.set_attribute(tr.USAGE_CACHE_READ_INPUT_TOKENS, delta.num_cached_tokens)
                    first = False
                else:
                    metrics.itl.observe(now - last)
                last = now
                n_out += len(delta.token_ids)
                if delta.finish_reason:
                    reasons.append(delta.finish_reason)
                metrics.generation_tokens.inc(len(delta.token_ids))
                yield delta
            metrics.e2e.observe(time.monotonic() - start)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            if running["counted"]:
                metrics.running.dec()
            span.set_attributes({tr.USAGE_OUTPUT_TOKENS: n_out, tr.RESPONSE_FINISH_REASONS: reasons})
            span.end()

    async def _collect(first: TokenDelta, deltas: AsyncIterator[TokenDelta]) -> tuple[str, int, str, int]:
        text, n_out, reason = first.text, len(first.token_ids), first.finish_reason or "stop"
        if not first.finished:
            async for delta in deltas:
                text += delta.text
                n_out += len(delta.token_ids)
                reason = delta.finish_reason or reason
        return text, n_out, reason, first.num_cached_tokens

    async def _sse(first: TokenDelta, deltas: AsyncIterator[TokenDelta], rid: str, kind: str, created: int,
                   chat: bool, include_usage: bool, n_prompt: int) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        n_out = 0

        def chunk(choices: list, usage: dict | None = None) -> str:
            body = {"id": rid, "object": chunk_kind, "created": created, "model": config.model_name,
                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        async def all_deltas() -> AsyncIterator[TokenDelta]:
            yield first
            if not first.finished:
                async for delta in deltas:
                    yield delta

        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for delta in all_deltas():
                n_out += len(delta.token_ids)
                if chat:
                    choice = {"index": 0, "delta": {"content": delta.text} if delta.text else {},
                              "finish_reason": delta.finish_reason}
                else:
                    choice = {"index": 0, "text": delta.text, "finish_reason": delta.finish_reason, "logprobs": None}
                if delta.text or delta.finish_reason:
                    yield chunk([choice])
            if include_usage:
                yield chunk([], _usage(n_prompt, n_out, first.num_cached_tokens))
            yield "data: [DONE]\n\n"
        except DisaggError as exc:
            yield sse_error(exc)
        except Exception as exc:  # never a silently cut stream: the client gets an error event
            yield sse_error(unexpected(exc))
        finally:
            await deltas.aclose()

    return app


class _AuthAndCount:
    """API key -> tenant (401 if wrong) and a request counter by endpoint and status.  A plain ASGI middleware:
    Starlette's BaseHTTPMiddleware would hide client disconnects from the endpoint."""

    def __init__(self, app, config: ApiConfig, metrics: RouterMetrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.startswith("/v1/"):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            tenant = self.config.tenant_of(headers.get("authorization", ""), headers.get(TENANT_HEADER))
            if tenant is None:
                self.metrics.requests.labels(path, "401").inc()
                await error_response(Unauthorized("invalid or missing API key", code="invalid_api_key"))(
                    scope, receive, send)
                return
            scope.setdefault("state", {})["tenant"] = tenant
        status = {"code": 500}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(path, str(status["code"])).inc()


def _usage(n_prompt: int, n_out: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": cached}}
