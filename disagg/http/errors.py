"""The one place where the project's errors become HTTP: status code + OpenAI-style error body.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Types follow OpenAI's (clients key their retry logic off the status: 429 and 5xx are retried by the official
clients, 4xx are not).  A 429 carries `Retry-After`.  The Anthropic Messages API (`/v1/messages`), and the Files API
when an Anthropic client calls it (its `anthropic-version` header), answer in Anthropic's dialect, with the same
statuses:

    {"type": "error", "error": {"type": ..., "message": ...}}

`install_error_handlers` puts the same mapping in front of FastAPI's own errors (validation, 404/405) and of
anything unexpected (a JSON 500, never a plain-text one).
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from disagg.errors import (
    Conflict,
    DeadlineExceeded,
    DisaggError,
    Forbidden,
    InternalError,
    InvalidRequest,
    ModelUnavailable,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceUnavailable,
    TransferFailed,
    Unauthorized,
    WorkerLost,
)

# (status, OpenAI error type) per error class; the first matching class in order wins
_TABLE: list[tuple[type[DisaggError], int, str]] = [
    (PayloadTooLarge, 413, "invalid_request_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (Unauthorized, 401, "authentication_error"),
    (Forbidden, 403, "permission_error"),
    (NotFound, 404, "not_found_error"),
    (Conflict, 409, "invalid_request_error"),
    (Overloaded, 429, "rate_limit_error"),
    (ServiceUnavailable, 503, "server_error"),
    (WorkerLost, 503, "server_error"),
    (TransferFailed, 503, "server_error"),
    (DeadlineExceeded, 504, "server_error"),
    (InternalError, 500, "server_error"),
]


class Dialect(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


ANTHROPIC_PATHS = ("/v1/messages",)
# paths both APIs define, each in its own shape (the Files API): the caller's dialect is its client's, which an
# Anthropic client names in every request's `anthropic-version` header
SHARED_PATHS = ("/v1/files",)
ANTHROPIC_VERSION_HEADER = "anthropic-version"
# Anthropic's error types by status (its docs' table).  Our 503 (no worker can serve now) is its
# "overloaded_error"; Anthropic sends that with its own status 529, we keep 503, which its client retries too.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def dialect_of(path: str, headers: Mapping[str, str]) -> Dialect:
    """The API a request speaks: by its path, or on a path both define by its client's header (lower-case names:
    ASGI's, and Starlette's case-insensitive headers alike)."""
    if path.startswith(ANTHROPIC_PATHS):
        return Dialect.ANTHROPIC
    if path.startswith(SHARED_PATHS) and ANTHROPIC_VERSION_HEADER in headers:
        return Dialect.ANTHROPIC
    return Dialect.OPENAI


def status_and_type(exc: DisaggError) -> tuple[int, str]:
    for cls, status, type_ in _TABLE:
        if isinstance(exc, cls):
            return status, type_
    return 500, "server_error"


def _body(status: int, type_: str, message: str, param: str | None, code: str | None, dialect: Dialect) -> dict:
    if dialect is Dialect.ANTHROPIC:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(exc: DisaggError, dialect: Dialect = Dialect.OPENAI) -> dict:
    status, type_ = status_and_type(exc)
    return _body(status, type_, exc.message, exc.param, exc.code, dialect)


def error_response(exc: DisaggError, extra: dict | None = None, dialect: Dialect = Dialect.OPENAI) -> JSONResponse:
    status, _ = status_and_type(exc)
    headers = {}
    if isinstance(exc, (Overloaded, ModelUnavailable)):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    content = error_body(exc, dialect)
    if extra:
        content.update(extra)
    return JSONResponse(status_code=status, content=content, headers=headers)


def sse_error(exc: DisaggError, dialect: Dialect = Dialect.OPENAI) -> str:
    """The error as one SSE event (what a stream sends when it fails after its headers went out)."""
    if dialect is Dialect.ANTHROPIC:
        return f"event: error\ndata: {json.dumps(error_body(exc, dialect))}\n\n"
    return f"data: {json.dumps(error_body(exc))}\n\n"


def unexpected(exc: BaseException) -> InternalError:
    return InternalError(f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as a JSON body of its API's dialect with its status (the table above)."""

    @app.exception_handler(DisaggError)
    async def _disagg_error(http: HTTPRequest, exc: DisaggError):
        return error_response(exc, dialect=dialect_of(http.url.path, http.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(http: HTTPRequest, exc: RequestValidationError):
        dialect = dialect_of(http.url.path, http.headers)
        # the error that got furthest into the body: of a union's branches, the one the client meant (an input
        # item of an unknown type is that, not "input should be a valid string")
        paths = [(_body_path(e.get("loc", ()), exc.body, missing=e.get("type") == "missing"), e) for e in exc.errors()]
        empty: tuple[list[str], Mapping] = ([], {})
        loc, first = max(paths, key=lambda pe: len(pe[0]), default=empty)
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        invalid = InvalidRequest(message, param=".".join(loc) or None, code=first.get("type"))
        if first.get("type") == "json_invalid":
            invalid = InvalidRequest("request body is not valid JSON", code="invalid_json")
        return error_response(invalid, dialect=dialect)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(http: HTTPRequest, exc: StarletteHTTPException):
        dialect = dialect_of(http.url.path, http.headers)
        if exc.status_code == 404:
            return error_response(NotFound(str(exc.detail)), dialect=dialect)
        if exc.status_code < 500:  # e.g. 405 method not allowed: keep the status, in the API's error shape
            body = _body(exc.status_code, "invalid_request_error", str(exc.detail), None, None, dialect)
            return JSONResponse(status_code=exc.status_code, content=body)
        return error_response(unexpected(exc), dialect=dialect)

    @app.exception_handler(Exception)
    async def _unexpected(http: HTTPRequest, exc: Exception):
        return error_response(unexpected(exc), dialect=dialect_of(http.url.path, http.headers))


def _body_path(loc: tuple, body: object, missing: bool) -> list[str]:
    """A validation error's location as a path into the body the client sent: pydantic's loc also names the
    union branch it tried ("str", "list[tagged-union[...]]", a tag), which are not in the body and are dropped;
    a missing field's name is kept.  A tag that is also a field's name ("text" of a text block) is the tag when
    the part after it is in the same object and not in that field's value (a tool's "function" is a field)."""
    parts = list(loc[1:] if loc[:1] == ("body",) else loc)
    if body is None:  # nothing to walk (not JSON): pydantic's loc as it is
        return [str(p) for p in parts]
    path: list[str] = []
    node: Any = body  # parsed JSON
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if _holds(node, part):
            after = None if last else parts[i + 1]
            tag = isinstance(node, dict) and part == node.get("type")
            if tag and not last and _holds(node, after) and not _holds(node[part], after):
                continue  # the union's tag, then a field of this same object
            node = node[part]
        elif not (missing and last):
            continue
        path.append(str(part))
    return path


def _holds(node: object, part: object) -> bool:
    """Whether `part` indexes into `node` (a key of an object, an index of a list)."""
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
