"""The response side of the HTTP API: the request's span, a delta stream timed into the router's metrics, and the
two ways a request's deltas reach the client (one JSON body, or SSE chunks that end with `[DONE]` or an error
event - never a silently cut stream).  A client that hangs up is noticed while we wait (ClientGone)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request as HTTPRequest
from opentelemetry import trace

from disagg import tracing as tr
from disagg.errors import DisaggError
from disagg.http.errors import sse_error, unexpected
from disagg.http.shape import AnswerShape, Collected
from disagg.protocol import Request, SamplingParams, TokenDelta
from disagg.telemetry import RouterMetrics


class ClientGone(Exception):
    pass


@dataclass
class Running:
    """What the route hook learned for the timed stream: whether the request was counted as running (it left the
    admission queue), and how many prompt tokens the router expected cached (the staleness histogram)."""

    model: str  # the served model's name: the request metrics' label
    counted: bool = False
    predicted: int | None = None


async def until_disconnect(awaitable: Awaitable, http: HTTPRequest, poll_s: float):
    """Await `awaitable`; if the client hangs up meanwhile, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(awaitable)
    while not task.done():
        await asyncio.wait({task}, timeout=poll_s)
        if not task.done() and await http.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone()
    return task.result()


TRACE_CONTEXT_HEADERS = ("traceparent", "tracestate")


def without_trace_context(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers less the client's W3C trace context: the router's own sampling decides (a new trace). For callers
    whose key may not force tracing: a sampled `traceparent` would otherwise make the router trace on demand."""
    return {k: v for k, v in headers.items() if k.lower() not in TRACE_CONTEXT_HEADERS}


def request_span(
    tracer: trace.Tracer,
    model: str,
    chat: bool,
    stream: bool,
    request: Request,
    sampling: SamplingParams,
    headers: Mapping[str, str],
    session: str | None,
) -> trace.Span:
    """The request's span (SERVER, GenAI semconv attributes), continuing the client's trace when it sent a
    traceparent."""
    operation = "chat" if chat else "text_completion"
    attributes: dict[str, Any] = {
        tr.OPERATION: operation,
        tr.PROVIDER_NAME: tr.PROVIDER,
        tr.REQUEST_MODEL: model,
        tr.REQUEST_MAX_TOKENS: sampling.max_tokens,
        tr.REQUEST_TEMPERATURE: sampling.temperature,
        tr.REQUEST_TOP_P: sampling.top_p,
        tr.REQUEST_STREAM: stream,
        tr.RESPONSE_ID: request.request_id,
        tr.USAGE_INPUT_TOKENS: len(request.prompt_token_ids),
    }
    if sampling.seed is not None:
        attributes[tr.REQUEST_SEED] = sampling.seed
    if session:
        attributes[tr.CONVERSATION_ID] = session
    return tracer.start_span(
        f"{operation} {model}", context=tr.extract(dict(headers)), kind=trace.SpanKind.SERVER, attributes=attributes
    )


async def timed(
    deltas: AsyncGenerator[TokenDelta, None],
    n_prompt: int,
    running: Running,
    span: trace.Span,
    metrics: RouterMetrics,
) -> AsyncGenerator[TokenDelta, None]:
    """Pass the deltas through, observing TTFT, ITL, E2E, tokens, prefix hits and routing staleness; end the
    request's span with its usage (and the exception, if the stream failed)."""
    start = last = time.monotonic()
    first = True
    n_out, reasons = 0, []
    model = running.model
    metrics.prompt_tokens.labels(model).inc(n_prompt)
    try:
        async for delta in deltas:
            now = time.monotonic()
            if first:
                metrics.ttft.labels(model).observe(now - start)
                metrics.prefix_cache_queries.labels(model).inc(n_prompt)
                metrics.prefix_cache_hits.labels(model).inc(delta.num_cached_tokens)
                if running.predicted is not None:
                    metrics.staleness.observe(running.predicted - delta.num_cached_tokens)
                span.set_attribute(tr.USAGE_CACHE_READ_INPUT_TOKENS, delta.num_cached_tokens)
                first = False
            else:
                metrics.itl.labels(model).observe(now - last)
            last = now
            n_out += len(delta.token_ids)
            if delta.finish_reason:
                reasons.append(delta.finish_reason)
            metrics.generation_tokens.labels(model).inc(len(delta.token_ids))
            yield delta
        metrics.e2e.labels(model).observe(time.monotonic() - start)
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        if running.counted:
            metrics.running.labels(model).dec()
        span.set_attributes({tr.USAGE_OUTPUT_TOKENS: n_out, tr.RESPONSE_FINISH_REASONS: reasons})
        span.end()


def typed_event(type_: str, data: dict[str, Any]) -> str:
    """An SSE event named by its type, the type also in its data (the Responses and Messages APIs' framing)."""
    return f"event: {type_}\ndata: {json.dumps({'type': type_, **data})}\n\n"


async def with_first(first: TokenDelta, deltas: AsyncIterator[TokenDelta]) -> AsyncIterator[TokenDelta]:
    """A request's deltas from the first one, which is already here (nothing follows a finished first delta)."""
    yield first
    if not first.finished:
        async for delta in deltas:
            yield delta


async def collect(first: TokenDelta, deltas: AsyncIterator[TokenDelta]) -> Collected:
    """A non-streaming answer: every delta of the request, gathered."""
    answer = Collected(num_cached_tokens=first.num_cached_tokens)
    async for delta in with_first(first, deltas):
        answer.add(delta)
    return answer


def usage(n_prompt: int, n_out: int, cached: int = 0, proposed: int = 0, accepted: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; speculative decoding's counts (when it proposed anything) as
    `completion_tokens_details.accepted_prediction_tokens` / `rejected_prediction_tokens`."""
    out: dict[str, Any] = {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if proposed:
        out["completion_tokens_details"] = {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": proposed - accepted,
        }
    return out


class EventIds(Protocol):
    """Where a stream stands, as its SSE events' `id:` name it (http/resume.py's Cursor)."""

    delivered: int  # output tokens sent so far

    def event_id(self) -> str: ...


async def sse(
    first: TokenDelta | None,
    deltas: AsyncGenerator[TokenDelta, None],
    rid: str,
    model: str,
    created: int,
    shape: AnswerShape,
    include_usage: bool,
    n_prompt: int,
    cursor: EventIds,
    skip_to: int | None = None,
) -> AsyncIterator[str]:
    """OpenAI SSE chunks (each with the cursor's event id) for a stream whose first delta may already be here;
    `[DONE]` at the end, or an error event if the stream fails after the 200 went out.  `skip_to`: a resumed stream
    (its deltas from the answer's first token; the client has `skip_to` tokens): those go through the shape
    silently, and only what follows is sent."""
    chunk_kind = "chat.completion.chunk" if shape.chat else "text_completion"
    cached: int | None = None
    spec = (0, 0)  # proposed, accepted (cumulative on each delta)

    def event(data: str) -> str:
        return f"id: {cursor.event_id()}\ndata: {data}\n\n"

    def chunk(choices: list, use: dict | None = None) -> str:
        body = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": choices}
        if use is not None:
            body["usage"] = use
        return event(json.dumps(body))

    def all_deltas() -> AsyncIterator[TokenDelta]:
        return with_first(first, deltas) if first is not None else deltas

    try:
        if shape.chat and skip_to is None:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for delta in all_deltas():
            cursor.delivered += len(delta.token_ids)
            cached = delta.num_cached_tokens if cached is None else cached
            spec = max(spec, (delta.num_proposed_tokens, delta.num_accepted_tokens))
            if skip_to is not None and cursor.delivered <= skip_to:
                shape.replay(delta)  # the client has it
            elif (choice := shape.stream_choice(delta)) is not None:
                yield chunk([choice])
        if include_usage:
            yield chunk([], usage(n_prompt, cursor.delivered, cached or 0, *spec))
        yield event("[DONE]")
    except DisaggError as exc:
        yield sse_error(exc)
    except Exception as exc:  # never a silently cut stream: the client gets an error event
        yield sse_error(unexpected(exc))
    finally:
        await deltas.aclose()


def json_answer(
    rid: str, kind: str, created: int, model: str, shape: AnswerShape, answer: Collected, n_prompt: int
) -> dict[str, Any]:
    """A non-streaming answer's body."""
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [shape.final_choice(answer)],
        "usage": usage(
            n_prompt,
            answer.num_tokens,
            answer.num_cached_tokens,
            answer.num_proposed_tokens,
            answer.num_accepted_tokens,
        ),
    }
