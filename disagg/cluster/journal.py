"""TokenJournal: a worker's record of the output of the requests it generates, so a stream outlives its relay.

The router process that relays a stream to the client may die (SIGKILL, a replica restart) while the worker keeps
generating.  The worker writes every TokenDelta of a request here, and readers follow an entry from any position:
the relay that started the request, or a relay the client reconnected to (SSE `Last-Event-ID`, a repeated
`Idempotency-Key`: http/resume.py), attached through the worker's `attach`.  Pure: asyncio only, no Ray, no engine.

Lifecycle of an entry:
  open (the request is added) -> deltas appended -> finished (its last delta): kept `ttl_s` for late readers, then
  dropped; finished entries are also bounded (`max_entries`, `max_tokens`: the oldest go first).  Unfinished ones
  are bounded by what the engine holds (each by its request's max_tokens).
  A reader that leaves before the end (its relay died, or Ray cancelled the stream) leaves the entry orphaned: it
  keeps generating for `orphan_grace_s` so a reconnect can attach; if no reader attaches by then, the client is
  gone: the entry is dropped and `on_orphan` told (the worker aborts the request and frees its blocks).
  `drop` (an explicit abort from a live relay) and `fail` (the worker cannot finish it) end an entry at once.
Access: an entry is read only by its request's tenant; any other tenant is told it does not exist.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from disagg.errors import StreamNotFound
from disagg.protocol import Request, TokenDelta


@dataclass
class JournalConfig:
    orphan_grace_s: float = 30.0  # a stream with no reader keeps generating this long for a reconnect
    ttl_s: float = 120.0  # a finished stream stays readable this long (a late reconnect, an idempotent repeat)
    max_entries: int = 4096  # finished streams kept at most (the oldest dropped first)
    max_tokens: int = 1 << 20  # tokens across the finished streams kept


class _Entry:
    def __init__(self, request: Request) -> None:
        self.request = request
        self.deltas: list[TokenDelta] = []
        self.tokens = 0
        self.finished = False
        self.error: BaseException | None = None  # set when the entry ended without finishing
        self.readers = 0
        self.orphan: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # the next wait is for the next change

    async def changed(self) -> None:
        await self._changed.wait()

    @property
    def closed(self) -> bool:
        return self.finished or self.error is not None


class Reader:
    """One reader of an entry, registered from `TokenJournal.attach` until `close()` (idempotent)."""

    def __init__(self, journal: TokenJournal, entry: _Entry) -> None:
        self.journal, self.entry, self.request = journal, entry, entry.request
        self._open = True

    async def deltas(self, start: int = 0) -> AsyncGenerator[TokenDelta, None]:
        """The entry's deltas after its first `start` tokens, then each new one as it comes, to the last."""
        entry, index, seen = self.entry, 0, 0
        while True:
            while index < len(entry.deltas):
                delta = entry.deltas[index]
                index += 1
                seen += len(delta.token_ids)
                if seen > start:
                    yield delta
            if entry.finished:
                return
            if entry.error is not None:
                raise entry.error
            await entry.changed()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.journal._left(self.entry)


class TokenJournal:
    def __init__(
        self,
        config: JournalConfig | None = None,
        on_orphan: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or JournalConfig()
        self.on_orphan, self.clock = on_orphan, clock
        self._entries: dict[str, _Entry] = {}
        self._finished: OrderedDict[str, float] = OrderedDict()  # request id -> when it finished, oldest first
        self._finished_tokens = 0
        self.orphans_aborted = 0

    def __contains__(self, request_id: str) -> bool:
        self._expire()
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ writers
    def open(self, request: Request) -> Reader:
        """A new entry for `request` and its first reader.  ValueError while a stream of that id runs; a finished
        one is replaced (a new generation under an old id: its readers were done, or come too late)."""
        old = self._entries.get(request.request_id)
        if old is not None and not old.finished:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._pop(request.request_id)
        entry = self._entries[request.request_id] = _Entry(request)
        entry.readers += 1
        return Reader(self, entry)

    def append(self, delta: TokenDelta) -> bool:
        """Record a delta (False: no such entry, e.g. dropped meanwhile); its last one finishes the entry."""
        entry = self._entries.get(delta.request_id)
        if entry is None or entry.closed:
            return False
        entry.deltas.append(delta)
        entry.tokens += len(delta.token_ids)
        if delta.finished:
            entry.finished = True
            self._cancel_orphan(entry)
            self._finished[delta.request_id] = self.clock()
            self._finished_tokens += entry.tokens
            self._expire()
        entry.notify()
        return True

    def fail(self, request_id: str, error: BaseException) -> None:
        """The request cannot finish here: its readers get `error`, and the entry is gone."""
        entry = self._pop(request_id)
        if entry is not None and not entry.finished:
            entry.error = error
            entry.notify()

    def fail_all(self, error: BaseException) -> None:
        for request_id in [rid for rid, e in self._entries.items() if not e.finished]:
            self.fail(request_id, error)

    def drop(self, request_id: str) -> bool:
        """An explicit abort: the entry is gone at once (a reader still attached is told the stream was lost)."""
        return self._drop(request_id, "the stream was cancelled")

    # ------------------------------------------------------------------ readers
    def attach(self, request_id: str, tenant: str | None) -> Reader:
        """A reader of the entry (StreamNotFound: unknown, expired, or another tenant's); it stops the orphan clock."""
        self._expire()
        entry = self._entries.get(request_id)
        if entry is None or entry.request.tenant != tenant:
            raise StreamNotFound(f"no stream {request_id!r} to resume")
        entry.readers += 1
        self._cancel_orphan(entry)
        return Reader(self, entry)

    def _left(self, entry: _Entry) -> None:
        entry.readers -= 1
        if entry.readers or entry.closed or self._entries.get(entry.request.request_id) is not entry:
            return
        loop = asyncio.get_running_loop()
        entry.orphan = loop.call_later(self.config.orphan_grace_s, self._orphan_expired, entry)

    def _orphan_expired(self, entry: _Entry) -> None:
        """No reader came back in time: the client is gone."""
        entry.orphan = None
        request_id = entry.request.request_id
        if entry.readers or entry.closed or self._entries.get(request_id) is not entry:
            return
        self._drop(request_id, "no reader came back in time")
        self.orphans_aborted += 1
        if self.on_orphan is not None:
            self.on_orphan(request_id)

    # ------------------------------------------------------------------ upkeep
    def _drop(self, request_id: str, why: str) -> bool:
        entry = self._pop(request_id)
        if entry is None:
            return False
        if not entry.finished:
            entry.error = StreamNotFound(f"stream {request_id!r} ended: {why}")
            entry.notify()
        return True

    def _pop(self, request_id: str) -> _Entry | None:
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self._cancel_orphan(entry)
            if self._finished.pop(request_id, None) is not None:
                self._finished_tokens -= entry.tokens
        return entry

    def _cancel_orphan(self, entry: _Entry) -> None:
        if entry.orphan is not None:
            entry.orphan.cancel()
            entry.orphan = None

    def _expire(self) -> None:
        """Drop finished entries past their TTL, then the oldest while over the bounds."""
        config, deadline = self.config, self.clock() - self.config.ttl_s
        while self._finished:
            request_id, finished_at = next(iter(self._finished.items()))
            over = len(self._finished) > config.max_entries or self._finished_tokens > config.max_tokens
            if finished_at > deadline and not over:
                return
            self._pop(request_id)
