"""The simulator's driver of the router's request state machine (`disagg/router/flight.py`): it carries out a
Flight's actions in virtual time on simulated workers, and feeds back what the workers do as events.  The rules
(fall back to a local prefill when the prefill worker is lost, migrate a request resumed after what the client
has, give up past the migration limit, what to count, charge, release and record) are the Flight's, shared with
the asyncio router; only the carrying out is here:

- RouteAttempt: the real RouterCore routes (on arrival with rescore off, among workers with room out of the
  admission queue and on a migration, else among every READY worker) and begins the load ticket;
- FetchKV from a prefill worker: the worker's engine prefills the request (its first token, KV held on a lease),
  as the real worker's `prefill` call does; its first token becomes the PrefillResult handed to the decode side.
  A peer's prefix export is not modelled (no export cost in the time model): the peer answers "nothing", and the
  decode worker computes the prompt, as when a real peer has nothing to offer;
- StartDecode: the decode worker's engine takes the request (reading remote KV through its connector first),
  after the measured hand-off overhead;
- Emit: the token reaches the caller's `on_token(time, delta)`.

What only the simulator measures stays here too: the prefix-cache outcome of each prompt where it was computed
(and the router's prediction error for it), and the serving CPU the machine model charges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from disagg.errors import WorkerLost
from disagg.protocol import FallbackKind, Request, TokenDelta
from disagg.router.decision import Decision
from disagg.router.flight import (
    Action,
    Admitted,
    ChargeTenant,
    CountFallback,
    CountMigration,
    CountPath,
    Delta,
    Emit,
    EndLoad,
    Fail,
    FetchKV,
    Flight,
    FlightState,
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
from disagg.router.latency import apply_latency

if TYPE_CHECKING:
    from disagg.sim.cluster import SimCluster
    from disagg.sim.worker import SimWorker


@dataclass
class SimFlight:
    """A request in the simulated cluster: the router's own Flight plus what the simulator measures."""

    flight: Flight
    on_token: Callable[[float, TokenDelta], None]
    session: str | None = None
    priority: int | None = None  # out of the admission queue: routed among the workers with room
    decision: Decision | None = None  # routed on arrival (rescore off): the first attempt goes there
    prefill_counted: bool = False  # the prompt's prefix-cache outcome was recorded where it was computed
    predicted: int = 0  # cached prompt tokens the router expected (its staleness is predicted - found)


class SimFlights:
    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster
        self.router = cluster.router
        self.flights: dict[str, SimFlight] = {}

    def start(
        self,
        request: Request,
        on_token: Callable[[float, TokenDelta], None],
        session: str | None,
        arrival: float,
        tenant: str = "default",
        decision: Decision | None = None,
        priority: int | None = None,
    ) -> None:
        """A request leaves the admission queue (or arrives, without one) now."""
        flight = Flight(request, tenant=tenant, arrival=arrival, max_migrations=self.router.config.max_migrations)
        sf = SimFlight(flight, on_token, session, priority, decision)
        self.flights[request.request_id] = sf
        self._run(sf, flight.on(Admitted(self.cluster.loop.now)))

    def deliver(self, worker: SimWorker, delta: TokenDelta) -> None:
        sf = self.flights.get(delta.request_id)
        if sf is None:
            return
        flight, decision = sf.flight, sf.flight.decision
        assert decision is not None
        if not sf.prefill_counted:
            self.cluster.count_prefix(len(flight.request.prompt_token_ids), delta.num_cached_tokens, sf.predicted)
            sf.prefill_counted = True
        if flight.state is FlightState.PREFILLING and worker.name == decision.prefill_worker:
            result = worker.engine.connector.prefill_result(
                delta.request_id, worker.name, delta.token_ids[0], None, delta.num_cached_tokens
            )
            self._run(sf, flight.on(KVReady(result)))
            return
        if worker.name != decision.decode_worker or flight.state not in (
            FlightState.HANDING_OFF,
            FlightState.STREAMING,
        ):
            return  # a dead incarnation's late output, or a prefill worker's after its part was done
        self._run(sf, flight.on(Delta(delta, self.cluster.loop.now)))

    def worker_lost(self, name: str) -> None:
        """The health monitor took `name` out of routing: requests it was decoding migrate; a prefill it was
        running for another decode worker falls back to a local prefill there."""
        for sf in list(self.flights.values()):
            flight, decision = sf.flight, sf.flight.decision
            if decision is None or flight.finished:
                continue
            error = WorkerLost(f"{name} killed", worker=name)
            if decision.decode_worker == name:
                self._run(sf, flight.on(Lost(name, error)))
            elif flight.state is FlightState.PREFILLING and decision.prefill_worker == name:
                self._run(sf, flight.on(KVFailed(error)))

    # ------------------------------------------------------------------------------------------ actions
    def _run(self, sf: SimFlight, actions: list[Action]) -> None:
        for action in actions:
            self._do(sf, action)
        if sf.flight.finished:
            self.flights.pop(sf.flight.request_id, None)

    def _do(self, sf: SimFlight, action: Action) -> None:  # noqa: C901 - one branch per action kind
        cluster, router, flight = self.cluster, self.router, sf.flight
        if isinstance(action, RouteAttempt):
            self._route(sf, action)
        elif isinstance(action, FetchKV):
            self._fetch(sf, action)
        elif isinstance(action, StartDecode):
            self._start_decode(sf, action)
        elif isinstance(action, ReportProgress):
            router.progress(action.ticket, action.generated)
        elif isinstance(action, PumpAdmission):
            if cluster.admission is not None:
                cluster.admission.pump()
        elif isinstance(action, ChargeTenant):
            if cluster.admission is not None:
                router.admission.queue.charge(action.tenant, action.tokens)
        elif isinstance(action, Emit):
            cluster.cores.on_tokens(cluster.loop.now, len(action.delta.token_ids))
            sf.on_token(cluster.loop.now, action.delta)
        elif isinstance(action, EndLoad):
            router.end(action.ticket)
        elif isinstance(action, ReleaseLease):
            cluster.release_lease(action.worker, flight.request_id)
        elif isinstance(action, RecordLatency):
            apply_latency(router.latency, router.counters, action)
        elif isinstance(action, (CountPath, CountFallback, CountMigration)):
            apply_count(router.counters, action)  # the result's migrations and fallbacks are read from there
        elif isinstance(action, Fail):
            cluster.counters["failed"] = cluster.counters.get("failed", 0) + 1

    def _route(self, sf: SimFlight, action: RouteAttempt) -> None:
        router, request = self.router, action.request
        hashes = router.block_hashes(request)
        if action.attempt == 0 and sf.decision is not None:
            decision = sf.decision
        elif action.attempt == 0 and sf.priority is None:
            decision = router.route(request, sf.session, hashes)  # no admission queue: dispatched at once
        else:
            decision = router.route_with_room(request, sf.session, hashes, sf.priority or 0, action.lost)
        ticket = router.begin(decision, request.num_tokens, hashes, request.sampling.max_tokens)
        sf.predicted = decision.predicted_cached_tokens(request.num_tokens, router.block_size)
        self._run(sf, sf.flight.on(Routed(decision, ticket)))

    def _fetch(self, sf: SimFlight, action: FetchKV) -> None:
        if action.source is FallbackKind.PEER_PREFIX:  # not modelled: the peer offers nothing (module docstring)
            self._run(sf, sf.flight.on(KVReady(None)))
            return
        prefill = self.cluster.worker(action.worker)
        self.cluster.counters["remote_prefills"] += 1
        request = action.request
        first = dataclasses.replace(request.sampling, max_tokens=len(request.resume_token_ids) + 1, stop=[])
        prefill.engine.add(dataclasses.replace(request, sampling=first), hold_kv=True)
        prefill.kick()

    def _start_decode(self, sf: SimFlight, action: StartDecode) -> None:
        cluster = self.cluster
        decode = cluster.worker(action.worker)
        if action.remote is None:
            decode.engine.add(action.request)
            decode.kick()
            return
        cluster.cores.on_handoff(cluster.loop.now)
        incarnation, attempt = decode.incarnation, sf.flight.attempt

        def start() -> None:
            if sf.flight.attempt != attempt or sf.flight.finished or decode.incarnation != incarnation:
                return  # the decode worker died meanwhile: the request migrated
            decode.engine.add(action.request, remote=action.remote)
            decode.kick()

        if cluster.config.handoff_overhead_s:
            cluster.loop.at(cluster.loop.now + cluster.config.handoff_overhead_s, start)
        else:
            start()
