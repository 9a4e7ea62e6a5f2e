"""One error hierarchy for the whole project.

Every error a request can meet is a `DisaggError` subclass that says what kind of failure it is; the HTTP layer
maps the class to a status code and an OpenAI-style body in one place (`http/errors.py`).  Inside the
cluster, `WorkerLost` and `TransferFailed` are recoverable: the router migrates the request or falls back to
local prefill / recompute; only when no fallback is left does a client see `ServiceUnavailable`.
"""

from __future__ import annotations

import enum

SLEEP_UNSUPPORTED = "sleep_unsupported"  # the code of a worker that cannot sleep (engine/sleep.py)


class DisaggError(Exception):
    """Base class.  `param` / `code` fill the OpenAI error body's fields of the same names."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(DisaggError, ValueError):
    """The client's input is wrong (bad field, prompt too long, ...). A ValueError too, so engine-level
    validation (which raises ValueError) and API-level validation end up in the same place."""


class PayloadTooLarge(InvalidRequest):
    """Part of the input is over a size limit (an image's bytes or pixels): 413, naming the limit."""


class NotFound(DisaggError):
    """An unknown model or route."""


class StreamNotFound(NotFound):
    """A resume (SSE Last-Event-ID, a repeated Idempotency-Key) names no journaled stream this caller may read:
    unknown, expired, aborted, or another tenant's (one answer for all, so existence does not leak)."""

    def __init__(self, message: str = "no such stream to resume", *, code: str | None = "stream_not_found") -> None:
        super().__init__(message, code=code)


class Unauthorized(DisaggError):
    """Missing or wrong API key."""


class Forbidden(DisaggError):
    """A known caller asking for what its key does not grant: /admin/* without the admin scope (or, with no keys
    configured, from a non-loopback client), a priority above the key's cap (403); a drill's fault order to a
    worker not started to take them (cluster/worker.py `set_faults`)."""


class Rejection(str, enum.Enum):
    """Why the admission queue refused a request: the Overloaded error's code, and the label of its count."""

    QUEUE_FULL = "queue_full"  # no room, and nothing of a lower band to shed
    SHED = "shed"  # pushed out by a higher-priority request
    DEADLINE = "deadline"  # estimated on arrival not to start in time (refused at once)
    EXPIRED = "expired"  # still queued at its deadline (refused then)
    CLOSED = "closed"  # still queued when its queue stopped (the router shutting down, its model unloaded)


class Overloaded(DisaggError):
    """The service is saturated and sheds this request (429 with Retry-After)."""

    def __init__(
        self, message: str, *, retry_after_s: float = 1.0, code: str | None = "overloaded", param: str | None = None
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s


class RateLimited(Overloaded):
    """The caller's key spent its token bucket (429 with Retry-After: when the next token is due)."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=retry_after_s, code="rate_limit_exceeded")


class InsecureExposure(DisaggError, ValueError):
    """A configuration that would serve a non-loopback address with no API key (refused unless --insecure)."""


class ServiceUnavailable(DisaggError):
    """No worker that could serve the request is alive (or every fallback is spent)."""


class ModelUnavailable(ServiceUnavailable):
    """The model named is being unloaded (draining) or not yet loaded: try again after `retry_after_s`."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0, code: str | None = "model_unavailable") -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class Conflict(DisaggError):
    """The change asked for clashes with the state now (a model id loaded or loading already, an alias in use)."""


class WorkerLost(DisaggError):
    """A worker died, hung or was taken out of routing while serving a request; the router migrates it."""

    def __init__(self, message: str, *, worker: str = "", code: str | None = "worker_lost") -> None:
        super().__init__(message, code=code)
        self.worker = worker


class OutputCorrupt(WorkerLost):
    """A worker's step produced output that cannot be right (NaN/Inf logits, a token id outside the vocabulary):
    the request is retried elsewhere like one whose worker died, and the worker takes itself out of routing."""

    def __init__(self, message: str, *, worker: str = "") -> None:
        super().__init__(message, worker=worker, code="output_corrupt")


class TransferFailed(DisaggError, RuntimeError):
    """A KV transfer failed or timed out; the receiving side recomputes."""


class DeadlineExceeded(DisaggError, TimeoutError):
    """A call past its deadline (prefill, KV read, stream start, snapshot)."""


class InternalError(DisaggError):
    """A bug or an unexpected failure: a JSON 500, never a plain-text one."""


class WireFormatError(DisaggError, ValueError):
    """A message from another process that does not match its schema (disagg/protocol.py): unknown or missing
    fields, a value of the wrong type, an unknown enum value, or bytes that are not msgpack at all."""
