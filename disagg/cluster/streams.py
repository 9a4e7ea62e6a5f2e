"""The generation side of an engine worker (EngineWorker's base): requests stream through its TokenJournal
(cluster/journal.py), so a stream outlives the relay that started it.

- `generate` adds the request to the engine and streams its deltas from the journal.  If the caller goes away
  before the end (its relay died, or Ray cancelled the stream), generation goes on for the journal's orphan grace,
  so that a reconnect can attach; with no reader by then, the request is aborted and its blocks freed.
- `attach` follows a journaled stream another relay started (SSE Last-Event-ID, a repeated Idempotency-Key).
- `abort` is a live relay's explicit word that its client went away: the request ends at once (no grace).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from disagg.cluster.journal import TokenJournal
from disagg.protocol import PrefillResult, Request

if TYPE_CHECKING:
    from disagg.cluster.image_resolver import ImageResolver
    from disagg.cluster.worker_config import WorkerConfig
    from disagg.engine.engine import LLMEngine
    from disagg.engine.mm_inputs import ImageEmbedding

log = logging.getLogger(__name__)


class JournaledStreams:
    config: WorkerConfig
    engine: LLMEngine
    images: ImageResolver | None  # a VLM's: requests' images into embedding rows (None: a text-only model)

    def __init__(self) -> None:
        self.journal = TokenJournal(self.config.journal, on_orphan=self._orphaned)
        self._aborts: set[asyncio.Task] = set()  # aborts of orphaned requests, until done

    # what the worker provides (cluster/worker.py)
    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    async def _submit(self, fn: Callable[[], Any]) -> None:
        raise NotImplementedError

    def _check_serving(self) -> None:
        raise NotImplementedError

    def _add(self, req: Request, **kwargs: Any) -> None:
        """engine.add on the engine thread, the request's images resolved first (encoded here if the router did
        not attach their rows: colocated encoding runs on this worker's thread, as its prefill does)."""
        images: list[ImageEmbedding] = []
        if req.images:
            if self.images is None:
                raise ValueError("this model takes no images")
            remote = kwargs.get("remote")
            whole = remote is not None and remote.first_token is not None  # a finished prefill: no recompute planned
            images = self.images.resolve(req, lazy=whole)
        self.engine.add(req, images=images, **kwargs)

    async def abort(self, request_id: str) -> bool:
        """A live relay's client went away: stop the request and forget its stream at once (no grace)."""
        self.journal.drop(request_id)
        # shielded: a caller cancelled meanwhile (its own client gone) must not leave the request running
        return await asyncio.shield(self._call(self.engine.abort, request_id))

    def _orphaned(self, request_id: str) -> None:
        """The journal's orphan grace ran out (no relay came back for the stream): free the request's blocks."""
        log.info("%s: no reader came back for %s; aborting it", self.config.name, request_id)
        task = asyncio.get_running_loop().create_task(self._call(self.engine.abort, request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def generate(self, request: bytes, remote: bytes | None = None) -> AsyncIterator[bytes]:
        """Stream TokenDeltas (msgpack) for a request; with `remote`, its KV is read from that worker first."""
        received = time.monotonic()  # the engine thread may be mid-step: waiting for it is queueing here
        req = Request.from_wire(request)
        result = PrefillResult.from_wire(remote) if remote is not None else None
        self._check_serving()
        reader = self.journal.open(req)
        try:
            await self._submit(lambda: self._add(req, remote=result, arrival_time=received))
        except BaseException:
            self.journal.drop(req.request_id)  # never started: nothing to resume
            reader.close()
            raise
        try:
            async for delta in reader.deltas():
                yield delta.to_wire()
        finally:
            reader.close()  # before the end: the stream is orphaned (the journal's grace starts)

    async def attach(self, request_id: str, start: int, tenant: str | None) -> AsyncIterator[bytes]:
        """Follow a journaled stream: its Request first (after a migration, resume_token_ids are what an earlier
        worker produced), then its TokenDeltas after `start` tokens, to the end.  StreamNotFound for an unknown,
        expired or other tenant's stream."""
        reader = self.journal.attach(request_id, tenant)
        try:
            yield reader.request.to_wire()
            async for delta in reader.deltas(start):
                yield delta.to_wire()
        finally:
            reader.close()
