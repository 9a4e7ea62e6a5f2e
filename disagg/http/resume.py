"""Resuming an answer on any relay (issue 23): the HTTP side of the workers' token journal (cluster/journal.py).

- Every SSE event carries `id:`, an opaque resume token: base64url of a `ResumeToken` message (msgpack, never
  pickle) naming the worker that generates the stream, the request id, and the tokens delivered up to that event
  (and, in the Responses and Messages streams, which of the events made at that token count it is: several are
  made per token, and some after the last).  After a migration (router/flight.py) the events name the new worker.
- A streaming POST with `Last-Event-ID` and the same body attaches to that stream instead of generating: the whole
  answer is replayed through the same AnswerShape silently up to the delivered count (so tool-call parsing and
  logprob offsets stand where they stood) and only what follows is sent, with the original's chunk `id` and
  `created`: the two connections' contents concatenate to exactly the uninterrupted answer.  The Responses and
  Messages renders replay their whole event sequence (`resume_events`: the same ids, sequence numbers and items)
  and send the events after the one named.
- A non-streaming request with `Idempotency-Key` gets a request id derived from (tenant, key): a repeat while it runs
  or within the journal's TTL is answered from the journal (the same body), not generated again.
Access: the worker serves a stream to its own tenant only; another tenant is told it does not exist (404).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import msgpack
from fastapi.responses import StreamingResponse

from disagg.engine.tokenizer import Tokenizer
from disagg.errors import InvalidRequest, StreamNotFound, WireFormatError
from disagg.http.shape import AnswerShape, Collected
from disagg.http.stream import sse, typed_event
from disagg.protocol import Request, TokenDelta
from disagg.router.handles import Attached
from disagg.router.resume import Resumer
from disagg.wire import WireMessage

LAST_EVENT_ID = "last-event-id"
IDEMPOTENCY_KEY = "idempotency-key"
_KEY_DIGEST_HEX = 32  # 128 bits of sha256(tenant, key) name an idempotent request


@dataclass
class ResumeToken(WireMessage):
    """Where a client stands in a stream: an SSE event's `id`, sent back as `Last-Event-ID`."""

    TYPE: ClassVar[str] = "resume_token"
    worker: str
    request_id: str
    delivered: int  # output tokens the client has, up to this event
    events: int = 0  # typed-event streams: the events made before this one at the same token count

    def encode(self) -> str:
        return base64.urlsafe_b64encode(self.to_wire()).rstrip(b"=").decode("ascii")

    @classmethod
    def parse(cls, text: str) -> ResumeToken:
        try:
            raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
            token = cls.from_wire(_with_events(raw))
        except (binascii.Error, ValueError, WireFormatError):
            raise InvalidRequest("Last-Event-ID is not an event id of this API", code="invalid_last_event_id") from None
        if token.delivered < 0 or token.events < 0:
            raise InvalidRequest("Last-Event-ID is not an event id of this API", code="invalid_last_event_id")
        return token


def _with_events(raw: bytes) -> bytes:
    """A token from a router before `events` existed (a rolling upgrade, a replica not yet restarted) names the
    event at its token count that chat streams have: the first (0)."""
    try:
        data = msgpack.unpackb(raw, raw=False)
    except Exception:  # msgpack raises several unrelated types for garbage: from_wire names the error
        return raw
    if isinstance(data, dict) and data.get("type") == ResumeToken.TYPE and "events" not in data:
        return msgpack.packb({**data, "events": 0}, use_bin_type=True)
    return raw


@dataclass
class Cursor:
    """A stream's position as its events name it: the worker of its next tokens, and the tokens sent so far."""

    request_id: str
    worker: str = ""
    delivered: int = 0
    events: int = 0  # typed-event streams: events made since `delivered` last moved

    def event_id(self) -> str:
        return ResumeToken(self.worker, self.request_id, self.delivered, self.events).encode()

    def advance(self, tokens: int) -> None:
        """`tokens` more output tokens are out (a typed-event stream's count of events at this count restarts)."""
        if tokens:
            self.delivered += tokens
            self.events = 0


class TypedEvents:
    """The SSE events of a Responses or Messages stream: each named by its type and carrying `id:` (where the
    stream stands: the cursor's tokens and the events made at that count).  On a resumed stream (`after`: the
    client's Last-Event-ID) every event is made again, so the render's state, numbering and items stand as they
    stood, and those up to `after` come back empty (the caller drops them)."""

    def __init__(self, cursor: Cursor, after: ResumeToken | None = None) -> None:
        self.cursor, self.after = cursor, after

    def __call__(self, type_: str, data: dict[str, Any]) -> str:
        c = self.cursor
        position, event_id = (c.delivered, c.events), c.event_id()
        c.events += 1
        if self.after is not None and position <= (self.after.delivered, self.after.events):
            return ""
        return f"id: {event_id}\n{typed_event(type_, data)}"


def idempotent_request_id(prefix: str, tenant: str, key: str) -> str:
    """The request id of a (tenant, Idempotency-Key) pair: the same for every repeat, different across tenants."""
    digest = hashlib.sha256(f"{tenant}\x00{key}".encode()).hexdigest()[:_KEY_DIGEST_HEX]
    return f"{prefix}-idem-{digest}"


def _check_same(original: Request, request: Request, what: str) -> None:
    same = (original.prompt_token_ids, original.sampling, original.lora) == (
        request.prompt_token_ids,
        request.sampling,
        request.lora,
    )
    if not same:
        raise InvalidRequest(
            f"{what} names another request (its prompt, sampling or adapter differ)", code="resume_mismatch"
        )


def resumed_text(tokenizer: Tokenizer, request: Request) -> str:
    """The text the client got for a migrated request's resumed tokens, rebuilt as the engine rebuilds it."""
    ids = list(request.prompt_token_ids)
    prefix = read = len(ids)
    text = ""
    for token in request.resume_token_ids:
        ids.append(token)
        new, prefix, read = tokenizer.decode_incremental(ids, prefix, read)
        text += new
    return text[: request.resume_num_chars]


async def history(attached: Attached, tokenizer: Tokenizer) -> AsyncGenerator[TokenDelta, None]:
    """Every delta of the answer from its first token: what an earlier worker produced (a migrated request, as one
    delta), then the journal's, to the end."""
    req = attached.request
    try:
        if req.resume_token_ids:
            text = resumed_text(tokenizer, req)
            yield TokenDelta(
                req.request_id, list(req.resume_token_ids), text, num_prompt_tokens=len(req.prompt_token_ids)
            )
        async for delta in attached.deltas:
            yield delta
    finally:
        await attached.deltas.aclose()


async def _attach(resumer: Resumer, token: ResumeToken, request: Request) -> Attached:
    """The journaled stream `token` names, checked to be this request's and resumable from there."""
    attached = await resumer.attach(token.worker, token.request_id, request.tenant)
    # on a refusal the stream is left unread: not aborted (it may be resumed right), but orphaned (the worker's grace)
    _check_same(attached.request, request, "Last-Event-ID")
    if token.delivered < len(attached.request.resume_token_ids):  # those came from a worker since lost
        raise StreamNotFound(f"no stream {token.request_id!r} to resume from there")
    return attached


async def resume_stream(
    resumer: Resumer, last_event_id: str, request: Request, shape: AnswerShape, model: str, include_usage: bool
) -> StreamingResponse:
    """The rest of the stream `Last-Event-ID` names, as SSE (404 stream_not_found when there is none to attach)."""
    token = ResumeToken.parse(last_event_id)
    attached = await _attach(resumer, token, request)
    cursor = Cursor(token.request_id, token.worker)
    shape.name_calls(token.request_id)
    deltas = history(attached, shape.tokenizer)
    n_prompt, created = len(request.prompt_token_ids), attached.request.created
    events = sse(
        None, deltas, token.request_id, model, created, shape, include_usage, n_prompt, cursor, token.delivered
    )
    return StreamingResponse(events, media_type="text/event-stream")


class EventRender(Protocol):
    """A typed-event render (Responses, Messages) as `resume_events` drives it."""

    shape: AnswerShape

    def events(
        self,
        first: TokenDelta,
        deltas: AsyncGenerator[TokenDelta, None],
        request: Request,
        cursor: Cursor,
        after: ResumeToken | None = None,
    ) -> AsyncIterator[str]: ...


async def resume_events(
    resumer: Resumer, token: ResumeToken, request: Request, render: EventRender, tokenizer: Tokenizer
) -> StreamingResponse:
    """The rest of a Responses or Messages stream after the event `token` names (404 stream_not_found when there
    is none to attach): the render's events made again from the answer's first token, those the client has
    dropped."""
    attached = await _attach(resumer, token, request)
    deltas = history(attached, tokenizer)
    try:
        first = await deltas.__anext__()
    except StopAsyncIteration:
        raise StreamNotFound(f"no stream {token.request_id!r} to resume from there") from None
    cursor = Cursor(token.request_id, token.worker)
    render.shape.name_calls(token.request_id)
    events = render.events(first, deltas, attached.request, cursor, token)
    return StreamingResponse((e async for e in events if e), media_type="text/event-stream")


async def journaled_answer(
    resumer: Resumer, request: Request, tokenizer: Tokenizer
) -> tuple[Request, Collected] | None:
    """An idempotent request already served or being served by some worker: its request and whole answer (None:
    no worker has it, so it is generated)."""
    attached = await resumer.find(request.request_id, request.tenant)
    if attached is None:
        return None
    _check_same(attached.request, request, "Idempotency-Key")  # refused: the stream is left unread (see above)
    answer: Collected | None = None
    async for delta in history(attached, tokenizer):
        if answer is None:
            answer = Collected(num_cached_tokens=delta.num_cached_tokens)
        answer.add(delta)
    if answer is None:  # an entry ends with its last delta: only an aborted one has none
        raise StreamNotFound(f"no answer for {request.request_id!r}")
    return attached.request, answer
