"""The one place where the project's errors become HTTP: status code + OpenAI-style error body.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Types follow OpenAI's (clients key their retry logic off the status: 429 and 5xx are retried by the official
clients, 4xx are not).  A 429 carries `Retry-After`.  `install_error_handlers` puts the same mapping in front of
FastAPI's own errors (validation, 404/405) and of anything unexpected (a JSON 500, never a plain-text one).
"""

from __future__ import annotations

import json
import math

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from disagg.errors import (
    DeadlineExceeded,
    DisaggError,
    Forbidden,
    InternalError,
    InvalidRequest,
    NotFound,
    Overloaded,
    ServiceUnavailable,
    TransferFailed,
    Unauthorized,
    WorkerLost,
)

# (status, OpenAI error type) per error class; the first matching class in order wins
_TABLE: list[tuple[type[DisaggError], int, str]] = [
    (InvalidRequest, 400, "invalid_request_error"),
    (Unauthorized, 401, "authentication_error"),
    (Forbidden, 403, "permission_error"),
    (NotFound, 404, "not_found_error"),
    (Overloaded, 429, "rate_limit_error"),
    (ServiceUnavailable, 503, "server_error"),
    (WorkerLost, 503, "server_error"),
    (TransferFailed, 503, "server_error"),
    (DeadlineExceeded, 504, "server_error"),
    (InternalError, 500, "server_error"),
]


def status_and_type(exc: DisaggError) -> tuple[int, str]:
    for cls, status, type_ in _TABLE:
        if isinstance(exc, cls):
            return status, type_
    return 500, "server_error"


def error_body(exc: DisaggError) -> dict:
    _, type_ = status_and_type(exc)
    return {"error": {"message": exc.message, "type": type_, "param": exc.param, "code": exc.code}}


def error_response(exc: DisaggError, extra: dict | None = None) -> JSONResponse:
    status, _ = status_and_type(exc)
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    content = error_body(exc)
    if extra:
        content.update(extra)
    return JSONResponse(status_code=status, content=content, headers=headers)


def sse_error(exc: DisaggError) -> str:
    """The error as one SSE event (what a stream sends when it fails after its headers went out)."""
    return f"data: {json.dumps(error_body(exc))}\n\n"


def unexpected(exc: BaseException) -> InternalError:
    return InternalError(f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-shaped JSON body with its status (the table above)."""

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
