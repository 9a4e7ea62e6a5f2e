"""Client-side coordinator: sends each request through a prefill worker (if any) and a decode worker.

Worker choice is round-robin here; the KV-aware router replaces `_pick`.  Cancellation (closing the async
iterator before the last delta) aborts the request on the decode worker and releases the prefill worker's lease.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, AsyncIterator

import ray
from ray.exceptions import RayActorError

from disagg.protocol import Request, TokenDelta

log = logging.getLogger(__name__)


class DisaggClient:
    def __init__(self, prefill_workers: list[Any], decode_workers: list[Any]) -> None:
        if not decode_workers:
            raise ValueError("at least one decode (or aggregated) worker is needed")
        self.prefill_workers = prefill_workers
        self.decode_workers = decode_workers
        self._prefill_rr = itertools.cycle(prefill_workers) if prefill_workers else None
        self._decode_rr = itertools.cycle(decode_workers)

    def _pick(self) -> tuple[Any | None, Any]:
        return (next(self._prefill_rr) if self._prefill_rr else None), next(self._decode_rr)

    async def generate(self, request: Request) -> AsyncIterator[TokenDelta]:
        prefill, decode = self._pick()
        async for delta in stream_request(request, prefill, decode):
            yield delta

    async def complete(self, request: Request) -> tuple[list[int], str, str]:
        """Collect a whole completion: (token ids, text, finish reason)."""
        return await collect(self.generate(request))


async def collect(deltas: AsyncIterator[TokenDelta]) -> tuple[list[int], str, str]:
    tokens, text, reason = [], "", ""
    async for delta in deltas:
        tokens += delta.token_ids
        text += delta.text
        reason = delta.finish_reason or reason
    return tokens, text, reason


async def stream_request(request: Request, prefill: Any | None, decode: Any) -> AsyncIterator[TokenDelta]:
    """One request through a chosen prefill worker (None: the decode worker prefills) and decode worker."""
    result = None
    if prefill is not None:
        try:
            result = await prefill.prefill.remote(request.to_wire())
        except RayActorError as exc:  # prefill worker gone: the decode worker prefills locally
            log.warning("prefill worker unavailable (%s); decoding worker prefills %s", exc, request.request_id)
    stream = decode.generate.remote(request.to_wire(), result)
    finished = False
    try:
        async for ref in stream:
            delta = TokenDelta.from_wire(await ref)
            finished = delta.finished
            yield delta
    finally:
        if not finished:
            ray.cancel(stream)
            await decode.abort.remote(request.request_id)
        if result is not None:
            try:  # normally already released by the read's notification; this covers every other path
                await prefill.release.remote(request.request_id)
            except RayActorError:
                pass
