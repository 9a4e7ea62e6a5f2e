"""OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions (SSE), /v1/models, /health,
/metrics.  Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with a 4xx status.
A client that disconnects cancels its request on every worker involved.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from disagg.engine.tokenizer import Tokenizer
from disagg.protocol import Request, SamplingParams, TokenDelta
from disagg.router.router import RouterCore
from disagg.router.schemas import ChatCompletionRequest, CompletionRequest
from disagg.telemetry import RouterMetrics


@dataclass
class ApiConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def build_app(core: RouterCore, tokenizer: Tokenizer, config: ApiConfig) -> FastAPI:
    app = FastAPI(title="disagg", docs_url=None, redoc_url=None)
    metrics = RouterMetrics()
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, exc: APIError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: HTTPRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, "request body is not valid JSON", code="invalid_json")
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return _error(400, message, param=".".join(loc) or None, code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.middleware("http")
    async def _auth_and_count(request: HTTPRequest, call_next):
        if config.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
                response = _error(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
                metrics.requests.labels(request.url.path, "401").inc()
                return response
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "decode_workers": len(core.decode), "prefill_workers": len(core.prefill)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "disagg", "max_model_len": config.max_model_len}]}

    def _check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error", "model",
                           "model_not_found")

    def _sampling(body, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        if prompt_len >= config.max_model_len:
            raise APIError(400, f"This model's maximum context length is {config.max_model_len} tokens. However, "
                                f"your prompt has {prompt_len} tokens.", param="prompt",
                           code="context_length_exceeded")
        room = config.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} is too large: the prompt has {prompt_len} tokens and "
                                f"the context holds {config.max_model_len}.", param="max_tokens",
                           code="context_length_exceeded")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, seed=body.seed, stop=body.stop_list(), ignore_eos=body.ignore_eos)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    def _tokenize_prompt(prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            return tokenizer.encode(prompt)
        if any(t < 0 or t >= tokenizer.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        return list(prompt)

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
            raise APIError(400, str(exc), param="messages") from exc
        sampling = _sampling(body, body.max_completion_tokens or body.max_tokens, len(ids))
        return await _serve("chatcmpl", "chat.completion", body, ids, sampling, http, chat=True)

    async def _serve(prefix: str, kind: str, body, ids: list[int], sampling: SamplingParams, http: HTTPRequest,
                     chat: bool):
        request = Request(f"{prefix}-{uuid.uuid4().hex}", ids, sampling)
        created = int(time.time())
        stream = _timed(core.generate(request, session=body.user), len(ids), request.request_id)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(stream, request.request_id, kind, created, chat, usage, len(ids)),
                                     media_type="text/event-stream")
        task = asyncio.ensure_future(_collect(stream))
        while not task.done():  # a client that hangs up cancels the request on every worker
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await http.is_disconnected():
                task.cancel()
                return _error(499, "client closed the request", code="client_closed")
        text, n_out, reason = task.result()
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": request.request_id, "object": kind, "created": created, "model": config.model_name,
                "choices": [choice], "usage": _usage(len(ids), n_out)}

    async def _timed(deltas: AsyncIterator[TokenDelta], n_prompt: int, request_id: str) -> AsyncIterator[TokenDelta]:
        start = last = time.monotonic()
        first = True
        metrics.running.inc()
        metrics.prompt_tokens.inc(n_prompt)
        try:
            async for delta in deltas:
                now = time.monotonic()
                if first:
                    metrics.ttft.observe(now - start)
                    metrics.prefix_cache_queries.inc(n_prompt)
                    metrics.prefix_cache_hits.inc(delta.num_cached_tokens)
                    decision = core.decision_of(request_id)
                    if decision is not None:
                        metrics.routed.labels(decision.decode_worker,
                                              "disaggregated" if decision.prefill_worker else "local").inc()
                    first = False
                else:
                    metrics.itl.observe(now - last)
                last = now
                metrics.generation_tokens.inc(len(delta.token_ids))
                yield delta
            metrics.e2e.observe(time.monotonic() - start)
        finally:
            metrics.running.dec()

    async def _collect(deltas: AsyncIterator[TokenDelta]) -> tuple[str, int, str]:
        text, n_out, reason = "", 0, "stop"
        try:
            async for delta in deltas:
                text += delta.text
                n_out += len(delta.token_ids)
                reason = delta.finish_reason or reason
        except ValueError as exc:  # the worker refused the request
            raise APIError(400, str(exc)) from exc
        return text, n_out, reason

    async def _sse(deltas: AsyncIterator[TokenDelta], rid: str, kind: str, created: int, chat: bool,
                   include_usage: bool, n_prompt: int) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        n_out = 0

        def chunk(choices: list, usage: dict | None = None) -> str:
            body = {"id": rid, "object": chunk_kind, "created": created, "model": config.model_name,
                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for delta in deltas:
                n_out += len(delta.token_ids)
                if chat:
                    choice = {"index": 0, "delta": {"content": delta.text} if delta.text else {},
                              "finish_reason": delta.finish_reason}
                else:
                    choice = {"index": 0, "text": delta.text, "finish_reason": delta.finish_reason, "logprobs": None}
                if delta.text or delta.finish_reason:
                    yield chunk([choice])
            if include_usage:
                yield chunk([], _usage(n_prompt, n_out))
            yield "data: [DONE]\n\n"
        except ValueError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error'}})}\n\n"
        finally:
            await deltas.aclose()

    return app


def _usage(n_prompt: int, n_out: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
