"""The asyncio driver of a request's Flight (router/flight.py): it carries out the actions the state machine asks
for against real workers and feeds back what happened as events.  The rules are the Flight's (shared with the
simulator's driver, disagg/sim/flights.py); the worker calls are AttemptRunner's (router/attempt.py); this module
only joins them on the event loop:

- RouteAttempt: the router routes (its `route` hook: the decision made on arrival, or among the workers with
  room), begins the load ticket, and a migrated request's earlier lease release is awaited first (a late release
  would free the new one);
- FetchKV: the remote prefill or the peer's prefix export, given up on as soon as that worker leaves routing;
  WorkerLost / DeadlineExceeded / TransferFailed become KVFailed (the fallback), InvalidRequest goes to the client;
- StartDecode: the decode worker's stream; each delta is a Delta event, and a lost worker, a broken stream or no
  first token within `stream_start_timeout_s` is Lost;
- Emit: the delta is yielded to the caller; Fail raises its error.

Lifecycle: one `fly()` per request, from admission to its last delta (or error).  If the caller stops early (the
client went away) or anything raises, the flight is aborted: the stream is closed, the lease released and the
load ticket ended, exactly once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from opentelemetry import trace

from disagg.errors import DeadlineExceeded, TransferFailed, WorkerLost
from disagg.protocol import PrefillResult, Request, TokenDelta
from disagg.router.admission import AdmissionQueue
from disagg.router.attempt import AttemptRunner
from disagg.router.decision import Decision
from disagg.router.flight import (
    Abort,
    Action,
    Admitted,
    ChargeTenant,
    CountFallback,
    CountMigration,
    CountPath,
    Delta,
    Emit,
    EndLoad,
    Event,
    Fail,
    FetchKV,
    Flight,
    KVFailed,
    KVReady,
    Lost,
    PumpAdmission,
    RecordLatency,
    ReleaseLease,
    ReportProgress,
    RouteAttempt,
    Routed,
    StartDecode,
    apply_count,
)
from disagg.router.latency import LatencyWindow, apply_latency
from disagg.router.load import LoadBook, LoadTicket

log = logging.getLogger(__name__)


@dataclass
class FlightHooks:
    """What the driver asks of the router core for one request (it never sees the core itself)."""

    route: Callable[[Request, int, str | None], Decision]  # (the attempt's request, its number, the worker lost)
    begin: Callable[[Decision, Request], LoadTicket]  # count the attempt's load (and let the queue move on)
    pump: Callable[[], None]  # capacity was freed: let queued requests go
    queue: AdmissionQueue  # tenants are charged for their tokens; its clock is the router's
    latency: LatencyWindow
    book: LoadBook


class _Stream:
    """The decode stream of the current attempt."""

    def __init__(self, worker: str, stream: AsyncGenerator[TokenDelta, None], timeout: float | None) -> None:
        self.worker, self.stream, self.timeout = worker, stream, timeout

    async def close(self) -> None:
        await self.stream.aclose()


class FlightDriver:
    def __init__(self, attempts: AttemptRunner, hooks: FlightHooks, span: trace.Span = trace.INVALID_SPAN) -> None:
        self.attempts, self.hooks, self.span = attempts, hooks, span

    async def fly(self, flight: Flight) -> AsyncGenerator[TokenDelta, None]:
        actions: deque[Action] = deque(flight.on(Admitted(self.hooks.queue.clock())))
        stream: _Stream | None = None
        try:
            while actions or not flight.finished:
                if not actions:  # nothing left to do but read the stream
                    assert stream is not None, "a live flight with no action and no stream"
                    event = await self._read(stream)
                    if isinstance(event, Lost):
                        await stream.close()
                        stream = None
                    actions.extend(flight.on(event))
                    continue
                action = actions.popleft()
                if isinstance(action, Emit):
                    yield action.delta
                elif isinstance(action, StartDecode):
                    stream = self._start(action)
                elif isinstance(action, Fail):
                    raise action.error
                else:
                    actions.extend(await self._do(flight, action))
        finally:
            if stream is not None:
                await stream.close()
            for action in flight.on(Abort()):  # nothing once the flight ended on its own
                await self._do(flight, action)

    async def _read(self, stream: _Stream) -> Event:
        try:
            delta = await self.attempts.next_delta(stream.stream, stream.timeout, stream.worker)
        except WorkerLost as exc:
            return Lost(stream.worker, exc)
        stream.timeout = None
        return Delta(delta, self.hooks.queue.clock())

    def _start(self, action: StartDecode) -> _Stream:
        handle = self.attempts.handle(action.worker)
        stream = handle.generate(action.request, action.remote)
        return _Stream(action.worker, stream, self.attempts.config.stream_start_timeout_s)

    async def _do(self, flight: Flight, action: Action) -> list[Action]:  # noqa: C901 - one branch per action
        hooks, rid = self.hooks, flight.request_id
        if isinstance(action, RouteAttempt):
            decision = hooks.route(action.request, action.attempt, action.lost)
            ticket = hooks.begin(decision, action.request)
            await self.attempts.released(rid)  # a migrated request's earlier lease goes first
            return flight.on(Routed(decision, ticket))
        if isinstance(action, FetchKV):
            return flight.on(await self._fetch(action))
        if isinstance(action, ReportProgress):
            hooks.book.progress(action.ticket, action.generated)
        elif isinstance(action, PumpAdmission):
            hooks.pump()
        elif isinstance(action, ChargeTenant):
            hooks.queue.charge(action.tenant, action.tokens)
        elif isinstance(action, EndLoad):
            hooks.book.end(action.ticket)
        elif isinstance(action, ReleaseLease):
            await self.attempts.release_soon(self.attempts.handle(action.worker), rid)
        elif isinstance(action, RecordLatency):
            apply_latency(hooks.latency, self.attempts.counters, action)
        elif isinstance(action, (CountPath, CountFallback, CountMigration)):
            apply_count(self.attempts.counters, action)
            if isinstance(action, CountFallback):
                self._fell_back(flight, action)
            elif isinstance(action, CountMigration):
                self._migrated(flight, action)
        return []

    async def _fetch(self, action: FetchKV) -> KVReady | KVFailed:
        try:
            result: PrefillResult | None = await self.attempts.fetch_kv(action.worker, action.request, action.source)
        except (WorkerLost, DeadlineExceeded, TransferFailed) as exc:
            return KVFailed(exc)
        return KVReady(result)

    def _fell_back(self, flight: Flight, action: CountFallback) -> None:
        self.span.add_event(
            "fallback",
            {"disagg.kind": action.source.value, "disagg.worker": action.worker, "disagg.error": action.error.message},
        )
        decode = flight.decision.decode_worker if flight.decision is not None else "?"
        log.warning(
            "%s on %s failed for %s (%s); computing on %s",
            action.source.value,
            action.worker,
            flight.request_id,
            action.error.message,
            decode,
        )

    def _migrated(self, flight: Flight, action: CountMigration) -> None:
        log.warning(
            "request %s lost %s after %d tokens (%s); migrating",
            flight.request_id,
            action.worker,
            action.delivered,
            action.error.message,
        )
        self.span.add_event(
            "migration",
            {
                "disagg.worker": action.worker,
                "disagg.tokens_delivered": action.delivered,
                "disagg.error": action.error.message,
            },
        )
