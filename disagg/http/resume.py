"""Resuming an answer on any relay (issue 23): the HTTP side of the workers' token journal (cluster/journal.py).

- Every SSE event carries `id:`, an opaque resume token: base64url of a `ResumeToken` message (msgpack, never
  pickle) naming the worker that generates the stream, the request id, and the tokens delivered up to that event.
  After a migration (router/flight.py) the events name the new worker.
- A streaming POST with `Last-Event-ID` and the same body attaches to that stream instead of generating: the whole
  answer is replayed through the same AnswerShape silently up to the delivered count (so tool-call parsing and
  logprob offsets stand where they stood) and only what follows is sent, with the original's chunk `id` and
  `created`: the two connections' contents concatenate to exactly the uninterrupted answer.
- A non-streaming request with `Idempotency-Key` gets a request id derived from (tenant, key): a repeat while it runs
  or within the journal's TTL is answered from the journal (the same body), not generated again.
Access: the worker serves a stream to its own tenant only; another tenant is told it does not exist (404).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import ClassVar

from fastapi.responses import StreamingResponse

from disagg.engine.tokenizer import Tokenizer
from disagg.errors import InvalidRequest, StreamNotFound, WireFormatError
from disagg.http.shape import AnswerShape, Collected
from disagg.http.stream import sse
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

    def encode(self) -> str:
        return base64.urlsafe_b64encode(self.to_wire()).rstrip(b"=").decode("ascii")

    @classmethod
    def parse(cls, text: str) -> ResumeToken:
        try:
            raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
            token = cls.from_wire(raw)
        except (binascii.Error, ValueError, WireFormatError):
            raise InvalidRequest("Last-Event-ID is not an event id of this API", code="invalid_last_event_id") from None
        if token.delivered < 0:
            raise InvalidRequest("Last-Event-ID is not an event id of this API", code="invalid_last_event_id")
        return token


@dataclass
class Cursor:
    """A stream's position as its events name it: the worker of its next tokens, and the tokens sent so far."""

    request_id: str
    worker: str = ""
    delivered: int = 0

    def event_id(self) -> str:
        return ResumeToken(self.worker, self.request_id, self.delivered).encode()


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


async def resume_stream(
    resumer: Resumer, last_event_id: str, request: Request, shape: AnswerShape, model: str, include_usage: bool
) -> StreamingResponse:
    """The rest of the stream `Last-Event-ID` names, as SSE (404 stream_not_found when there is none to attach)."""
    token = ResumeToken.parse(last_event_id)
    attached = await resumer.attach(token.worker, token.request_id, request.tenant)
    # on a refusal the stream is left unread: not aborted (it may be resumed right), but orphaned (the worker's grace)
    _check_same(attached.request, request, "Last-Event-ID")
    if token.delivered < len(attached.request.resume_token_ids):  # those came from a worker since lost
        raise StreamNotFound(f"no stream {token.request_id!r} to resume from there")
    cursor = Cursor(token.request_id, token.worker)
    deltas = history(attached, shape.tokenizer)
    n_prompt, created = len(request.prompt_token_ids), attached.request.created
    events = sse(
        None, deltas, token.request_id, model, created, shape, include_usage, n_prompt, cursor, token.delivered
    )
    return StreamingResponse(events, media_type="text/event-stream")


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
