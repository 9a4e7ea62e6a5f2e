"""One request's life as a sans-IO state machine: events in, actions out.

A `Flight` knows the rules of serving one request through the workers the router picks - when to fetch KV from
another worker, when to fall back to a local prefill, what a lost worker means (migrate, resumed after what the
client already has, or give up past the limit), what to count, charge, release and record - and nothing about
how any of it happens.  Two drivers execute its actions: the asyncio router (`RouterCore.generate` with
`router/attempt.py` making the worker calls) and the virtual-time simulator (`SimCluster`).  A rule changed here
changes both; neither keeps a copy.

Lifecycle (`FlightState`):

    QUEUED --Admitted--> (RouteAttempt) --Routed--> ROUTED
    ROUTED: remote KV chosen (a prefill worker, or a peer's cached prefix) -> PREFILLING (FetchKV)
            else -> STREAMING (StartDecode, local prefill on the decode worker)
    PREFILLING --KVReady--> HANDING_OFF (StartDecode with the remote KV; the decode worker reads it)
    PREFILLING --KVFailed--> STREAMING (fallback: StartDecode without remote KV; the owner's lease released)
    HANDING_OFF --Delta--> STREAMING
    HANDING_OFF / STREAMING --Delta(finished)--> DONE (ReleaseLease, RecordLatency, EndLoad, then Emit: a delta
            is always the last action, so a caller that stops reading at it leaves nothing unsettled)
    ROUTED / PREFILLING / HANDING_OFF / STREAMING --Lost--> MIGRATING (RouteAttempt for the request resumed after
            the delivered tokens) ... or FAILED past `max_migrations` (Fail)
    any live state --Abort--> FAILED (the client went away, or the driver hit an error: EndLoad, ReleaseLease)

Load accounting stays with the driver's `LoadBook` (it must begin the ticket under the routing lock); the
flight only says when a ticket ends and how far it got.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from disagg.errors import DisaggError, ServiceUnavailable
from disagg.protocol import FallbackKind, PrefillResult, Request, ServePath, TokenDelta
from disagg.router.decision import Decision
from disagg.router.latency import RecordLatency as RecordLatency  # re-exported: one of the flight's actions
from disagg.router.load import LoadTicket
from disagg.stats import RouterCounters


class FlightState(enum.Enum):
    QUEUED = "queued"
    ROUTED = "routed"
    PREFILLING = "prefilling"
    HANDING_OFF = "handing_off"
    STREAMING = "streaming"
    MIGRATING = "migrating"
    DONE = "done"
    FAILED = "failed"


LIVE = frozenset({FlightState.ROUTED, FlightState.PREFILLING, FlightState.HANDING_OFF, FlightState.STREAMING})


# ---------------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Admitted:
    """The request left the admission queue at `now` (the driver's clock)."""

    now: float


@dataclass(frozen=True)
class Routed:
    decision: Decision
    ticket: LoadTicket


@dataclass(frozen=True)
class KVReady:
    """The remote prefill (or the peer's prefix export) answered; None: the peer had nothing to offer."""

    result: PrefillResult | None


@dataclass(frozen=True)
class KVFailed:
    error: DisaggError


@dataclass(frozen=True)
class Delta:
    delta: TokenDelta
    now: float


@dataclass(frozen=True)
class Lost:
    """The decode worker of the current attempt is gone (dead, broken stream, or no first token in time)."""

    worker: str
    error: DisaggError


@dataclass(frozen=True)
class Abort:
    error: BaseException | None = None


Event = Admitted | Routed | KVReady | KVFailed | Delta | Lost | Abort


# --------------------------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class RouteAttempt:
    """Route `request` (the original, or resumed after a lost worker) and begin its load ticket; answer Routed."""

    request: Request
    attempt: int  # 0 for the first
    lost: str | None = None  # the worker the last attempt lost: routed elsewhere while another is left


@dataclass(frozen=True)
class FetchKV:
    """Ask `worker` for the request's KV (prefill it, or export its cached prefix); answer KVReady or KVFailed."""

    worker: str
    request: Request
    source: FallbackKind


@dataclass(frozen=True)
class StartDecode:
    """Stream the request from `worker`, reading `remote` KV first when given; answer Delta (or Lost)."""

    worker: str
    request: Request
    remote: PrefillResult | None


@dataclass(frozen=True)
class CountPath:
    path: ServePath


@dataclass(frozen=True)
class CountFallback:
    source: FallbackKind
    worker: str
    error: DisaggError


@dataclass(frozen=True)
class CountMigration:
    worker: str
    delivered: int  # tokens the client already has
    error: DisaggError  # why the worker was lost (the driver logs it)


@dataclass(frozen=True)
class ReportProgress:
    ticket: LoadTicket
    generated: int  # tokens this attempt generated so far


@dataclass(frozen=True)
class PumpAdmission:
    """Capacity was freed (the prompt left the prefill queue, or the request ended): let queued requests go."""


@dataclass(frozen=True)
class Emit:
    delta: TokenDelta


@dataclass(frozen=True)
class ChargeTenant:
    tenant: str
    tokens: int


@dataclass(frozen=True)
class EndLoad:
    ticket: LoadTicket


@dataclass(frozen=True)
class ReleaseLease:
    """The worker that contributed KV may free its lease (best effort, off the request's path)."""

    worker: str


@dataclass(frozen=True)
class Fail:
    error: DisaggError


Action = (
    RouteAttempt
    | FetchKV
    | StartDecode
    | CountPath
    | CountFallback
    | CountMigration
    | ReportProgress
    | PumpAdmission
    | Emit
    | ChargeTenant
    | EndLoad
    | ReleaseLease
    | RecordLatency
    | Fail
)


CountAction = CountPath | CountFallback | CountMigration


def apply_count(counters: RouterCounters, action: CountAction) -> None:
    """Carry out a Count* action on the router's counters: both drivers count through here, so what a path, a
    fallback or a migration adds up to is written once (each driver keeps its own logging beside it)."""
    if isinstance(action, CountPath):
        counters.served(action.path)
    elif isinstance(action, CountFallback):
        counters.fell_back(action.source)
    else:
        counters.migrations += 1


class IllegalEvent(RuntimeError):
    """A driver fed an event the flight cannot take in its state (a driver bug, never a client's)."""


@dataclass
class Flight:
    request: Request
    tenant: str = "default"
    arrival: float = 0.0
    max_migrations: int = 3
    state: FlightState = FlightState.QUEUED
    attempt: int = 0
    decision: Decision | None = None
    ticket: LoadTicket | None = None
    sent: list[int] = field(default_factory=list)  # tokens delivered to the client over every attempt
    sent_chars: int = 0
    generated: int = 0  # tokens of the current attempt
    first_token_at: float | None = None
    admitted_at: float | None = None  # when the first attempt was routed (its prediction's clock starts)
    owner: str | None = None  # the worker holding a lease on KV it contributed to the current attempt
    fell_back: bool = False  # the current attempt's prompt was computed on its decode worker after all

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def current(self) -> Request:
        """The request as the current attempt sends it (resumed after the delivered tokens after a migration)."""
        return self.request.resumed(self.sent, self.sent_chars) if self.attempt else self.request

    @property
    def finished(self) -> bool:
        return self.state in (FlightState.DONE, FlightState.FAILED)

    def on(self, event: Event) -> list[Action]:
        """Apply one event; the actions to carry out, in order."""
        if isinstance(event, Admitted):
            self._expect(FlightState.QUEUED)
            self.admitted_at = event.now
            return [RouteAttempt(self.request, 0)]
        if isinstance(event, Routed):
            self._expect(FlightState.QUEUED, FlightState.MIGRATING)
            return self._routed(event)
        if isinstance(event, KVReady):
            self._expect(FlightState.PREFILLING)
            return self._kv_ready(event.result)
        if isinstance(event, KVFailed):
            self._expect(FlightState.PREFILLING)
            return self._kv_failed(event.error)
        if isinstance(event, Delta):
            self._expect(FlightState.HANDING_OFF, FlightState.STREAMING)
            return self._delta(event.delta, event.now)
        if isinstance(event, Lost):
            self._expect(*LIVE)
            return self._lost(event)
        if isinstance(event, Abort):
            return self._abort()
        raise IllegalEvent(f"unknown event {event!r}")

    # ------------------------------------------------------------------------------------------ transitions
    def _routed(self, event: Routed) -> list[Action]:
        self.decision, self.ticket, self.generated = event.decision, event.ticket, 0
        self.state = FlightState.ROUTED
        source = event.decision.prefill_worker or event.decision.peer_worker
        if source is not None:
            kind = FallbackKind.PREFILL if event.decision.prefill_worker else FallbackKind.PEER_PREFIX
            self.state = FlightState.PREFILLING
            return [FetchKV(source, self.current, kind)]
        return self._start(None, ServePath.LOCAL)

    def _kv_ready(self, result: PrefillResult | None) -> list[Action]:
        assert self.decision is not None
        self.owner = (self.decision.prefill_worker or self.decision.peer_worker) if result is not None else None
        if result is None:  # the peer had nothing: computed locally, as when the policy chose so
            return self._start(None, ServePath.FALLBACK)
        path = ServePath.DISAGGREGATED if self.decision.prefill_worker else ServePath.PEER_PREFIX
        return self._start(result, path)

    def _kv_failed(self, error: DisaggError) -> list[Action]:
        assert self.decision is not None
        source = self.decision.prefill_worker or self.decision.peer_worker
        assert source is not None
        kind = FallbackKind.PREFILL if self.decision.prefill_worker else FallbackKind.PEER_PREFIX
        self.owner = None
        return [CountFallback(kind, source, error), ReleaseLease(source), *self._start(None, ServePath.FALLBACK)]

    def _start(self, remote: PrefillResult | None, path: ServePath) -> list[Action]:
        assert self.decision is not None
        self.fell_back = path is ServePath.FALLBACK
        self.state = FlightState.HANDING_OFF if remote is not None else FlightState.STREAMING
        return [
            CountPath(ServePath.MIGRATED if self.attempt else path),
            StartDecode(self.decision.decode_worker, self.current, remote),
        ]

    def _delta(self, delta: TokenDelta, now: float) -> list[Action]:
        assert self.ticket is not None
        self.state = FlightState.STREAMING
        n = len(delta.token_ids)
        self.generated += n
        actions: list[Action] = [ReportProgress(self.ticket, self.generated)]
        if self.generated == n:
            actions.append(PumpAdmission())  # the attempt's first output: its prompt left the prefill queue
        if self.first_token_at is None:
            self.first_token_at = now
        self.sent += delta.token_ids
        self.sent_chars += len(delta.text)
        actions.append(ChargeTenant(self.tenant, n))
        if delta.finished:  # settled before the last delta goes out: a client may stop reading right there
            self.state = FlightState.DONE
            actions += [
                *self._release(),
                RecordLatency(self.arrival, self.first_token_at, now, len(self.sent), *self._prediction()),
                EndLoad(self.ticket),
                PumpAdmission(),
            ]
        return [*actions, Emit(delta)]  # always last: nothing is left to do once the caller has it

    def _prediction(self) -> tuple[float | None, float | None, str, float]:
        """The first attempt's predicted TTFT, when it was routed, the worker that computed the prompt ("" when
        priced from the prior) and its correction (None, None after a migration: another decision)."""
        d = self.decision
        if self.attempt or d is None:
            return None, None, "", 1.0
        # only a prediction from the worker's own measurements teaches its correction (the prior is another model),
        # and only when that worker computed the prompt as priced (a fallback's time is another worker's and a
        # failure's; a peer's prefix is priced as computed, not as pulled)
        teaches = d.ttft_measured and not self.fell_back and d.peer_worker is None
        return (
            d.predicted_ttft_s,
            self.admitted_at,
            (d.prefill_worker or d.decode_worker) if teaches else "",
            d.ttft_factor,
        )

    def _lost(self, event: Lost) -> list[Action]:
        assert self.ticket is not None
        lost = CountMigration(event.worker, len(self.sent), event.error)
        actions: list[Action] = [lost, *self._release(), EndLoad(self.ticket)]
        self.ticket = None
        if self.attempt >= self.max_migrations:
            self.state = FlightState.FAILED
            error = ServiceUnavailable(
                f"request lost its worker {self.max_migrations + 1} times; giving up", code="migration_limit"
            )
            return [*actions, PumpAdmission(), Fail(error)]
        self.attempt += 1
        self.state = FlightState.MIGRATING
        return [*actions, RouteAttempt(self.current, self.attempt, event.worker)]

    def _abort(self) -> list[Action]:
        if self.finished:
            return []
        actions: list[Action] = [*self._release()]
        if self.ticket is not None:
            actions.append(EndLoad(self.ticket))
            self.ticket = None
        self.state = FlightState.FAILED
        return [*actions, PumpAdmission()]

    def _release(self) -> list[Action]:
        owner, self.owner = self.owner, None
        return [ReleaseLease(owner)] if owner is not None else []

    def _expect(self, *states: FlightState) -> None:
        if self.state not in states:
            raise IllegalEvent(f"{self.request_id}: event not allowed in state {self.state.value}")
