"""OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions (SSE), /v1/models, probes
(/livez, /readyz, /health) and /metrics.

Errors are OpenAI-shaped (router/http_errors.py maps the project's error classes to statuses in one place); an
unexpected exception is a JSON 500, never a plain-text one.  A streaming request is only answered with 200 once
its first token exists, so a request that cannot be served gets a real status (503, 400, ...); a failure after
that is an SSE error event, and the stream ends.  A client that disconnects cancels its request on every worker.
"""

from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from disagg.engine.tokenizer import Tokenizer
from disagg.errors import DisaggError, InvalidRequest, NotFound, ServiceUnavailable, Unauthorized
from disagg.protocol import Request, Role, SamplingParams
from disagg.router.api_inputs import chat_prompt, check_model, priority_of, sampling_params, tokenize_prompt
from disagg.router.api_shape import AnswerShape
from disagg.router.api_stream import ClientGone, collect, request_span, sse, timed, until_disconnect, usage
from disagg.router.http_errors import error_response, unexpected
from disagg.router.metrics_view import cluster_snapshot
from disagg.router.router import RouterCore
from disagg.router.schemas import ChatCompletionRequest, CompletionRequest, RoleChangeBody
from disagg.telemetry import RouterMetrics

SESSION_HEADER = "x-session-id"
TENANT_HEADER = "x-tenant-id"


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


def build_app(core: RouterCore, tokenizer: Tokenizer, config: ApiConfig) -> FastAPI:
    tracer = core.tracer

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        core.admission.start()
        if core.supervisor is not None:
            core.supervisor.start()
        if core.planner is not None:
            core.planner.start()
        yield
        if core.planner is not None:
            await core.planner.stop()
        if core.supervisor is not None:
            await core.supervisor.stop()
        await core.admission.stop()
        await core.drain_releases()

    app = FastAPI(title="disagg", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = RouterMetrics(lambda: cluster_snapshot(core))
    core.on_queue_wait = metrics.queue_wait.observe
    app.state.metrics = metrics

    _install_error_handlers(app)
    app.add_middleware(_AuthAndCount, config=config, metrics=metrics)

    # ------------------------------------------------------------------ probes
    def _status() -> dict[str, Any]:
        workers = {
            n: {"role": w.role.value, "state": w.state.value, "reason": w.reason, "restarts": w.restarts}
            for n, w in core.health.workers.items()
        }
        live = core.health.live_counts()
        return {
            "live": live,
            "decode_workers": live["decode"] + live["both"],
            "prefill_workers": live["prefill"],
            "workers": workers,
        }

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
            return error_response(
                ServiceUnavailable("no decode worker is alive", code="no_workers"),
                extra={"status": "unavailable", **status},
            )
        return {"status": "ok", **status}

    # ------------------------------------------------------------------ roles (router/roles.py, disagg/planner/)
    @app.get("/admin/roles")
    async def roles():
        return {
            "roles": {n: w.role.value for n, w in core.health.workers.items()},
            "changes": [r.as_dict() for r in core.roles.records],
            "planner": core.planner.status() if core.planner is not None else None,
        }

    @app.post("/admin/workers/{name}/role")
    async def change_role(name: str, body: RoleChangeBody):
        record = await core.roles.change(name, Role(body.role), reason=body.reason)
        return record.as_dict()

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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

    # ------------------------------------------------------------------ generation endpoints
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model, config.model_name)
        ids = tokenize_prompt(body.prompt, tokenizer)
        sampling = sampling_params(
            body,
            body.max_tokens if body.max_tokens is not None else 16,
            len(ids),
            config.max_model_len,
            logprobs=body.logprobs,
        )
        shape = AnswerShape(tokenizer, chat=False, logprobs=body.logprobs is not None)
        return await _serve("cmpl", "text_completion", body, ids, sampling, http, shape)

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
        return await _serve("chatcmpl", "chat.completion", body, ids, sampling, http, shape)

    async def _serve(
        prefix: str, kind: str, body, ids: list[int], sampling: SamplingParams, http: HTTPRequest, shape: AnswerShape
    ):
        chat = shape.chat
        session = http.headers.get(SESSION_HEADER) or body.user
        retention = body.kv_retention.ttl_s if body.kv_retention is not None else None
        priority = priority_of(body, http.headers)
        request = Request(
            f"{prefix}-{uuid.uuid4().hex}",
            ids,
            sampling,
            session_id=session,
            kv_retention_s=retention,
            priority=priority,
        )
        created = int(time.time())
        tenant = getattr(http.state, "tenant", "default")
        running = {"counted": False, "predicted": None}
        span = request_span(
            tracer, config.model_name, chat, bool(body.stream), request, sampling, http.headers, session
        )

        def on_route(decision) -> None:  # left the admission queue: now it runs
            metrics.on_route(decision)
            if not running["counted"]:
                running["counted"] = True
                running["predicted"] = decision.predicted_cached_tokens(len(ids), core.block_size)
                metrics.running.inc()

        stream = timed(
            core.generate(
                request,
                session=session,
                on_route=on_route,
                tenant=tenant,
                priority=priority,
                deadline_s=body.deadline_s,
                span=span,
            ),
            len(ids),
            running,
            span,
            metrics,
        )
        try:
            first = await until_disconnect(stream.__anext__(), http, config.disconnect_poll_s)
        except ClientGone:
            await stream.aclose()
            return error_response(InvalidRequest("client closed the request", code="client_closed"))
        except StopAsyncIteration:
            raise ServiceUnavailable("the request ended without output", code="empty_stream") from None
        except BaseException:
            await stream.aclose()
            raise
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                sse(first, stream, request.request_id, config.model_name, created, shape, include_usage, len(ids)),
                media_type="text/event-stream",
            )
        try:
            answer = await until_disconnect(collect(first, stream), http, config.disconnect_poll_s)
        except ClientGone:
            await stream.aclose()
            return error_response(InvalidRequest("client closed the request", code="client_closed"))
        return {
            "id": request.request_id,
            "object": kind,
            "created": created,
            "model": config.model_name,
            "choices": [shape.final_choice(answer)],
            "usage": usage(len(ids), answer.num_tokens, answer.num_cached_tokens),
        }

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
        if path.startswith(("/v1/", "/admin/")):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            tenant = self.config.tenant_of(headers.get("authorization", ""), headers.get(TENANT_HEADER))
            if tenant is None:
                self.metrics.requests.labels(path, "401").inc()
                await error_response(Unauthorized("invalid or missing API key", code="invalid_api_key"))(
                    scope, receive, send
                )
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


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-shaped JSON body with its status (router/http_errors.py)."""

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
            body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}}
            return JSONResponse(status_code=exc.status_code, content=body)
        return error_response(unexpected(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: HTTPRequest, exc: Exception):
        return error_response(unexpected(exc))
