"""Router core: worker registry and health, KV index upkeep, per-request routing, load accounting (router/load.py), and
serving a request through its workers with fallbacks and migration.

No Ray and no HTTP here: workers are `WorkerHandle`s (router/handles.py).  Thread-safe (one lock): the HTTP
server's event loop routes requests while the router actor's threads apply KV event batches.

Serving one request (`generate`): it waits in the admission queue, then its life is a Flight (router/flight.py:
the rules below, shared with the simulator) driven on this event loop by router/drive.py:
  1. route it (only READY workers count); no decode-capable worker READY -> ServiceUnavailable (503);
  2. remote prefill on the chosen prefill worker, with a deadline; if it fails or times out the decode worker
     prefills locally (and the prefill worker's lease, if any, is released) - or, when the policy chose a peer
     pull, the peer's cached prefix is offered to the decode worker;
  3. stream from the decode worker: the first delta within `stream_start_timeout_s`; while streaming, the
     worker's death (the health supervisor takes it out of routing) or a broken stream raises WorkerLost
     (steps 2 and 3 are one attempt; its worker calls are router/attempt.py's);
  4. on WorkerLost the request migrates: routed again as prompt + the tokens the client already has
     (`Request.resumed`; elsewhere while another worker is left), so the stream continues with no duplicate and
     no missing token, up to `max_migrations` times; then, or when no decode-capable worker is left, 503.

Lifecycle: built with its workers' handles (None: a routing-only core: simulator, benchmarks); `start()` starts
admission, health supervisor and KV-event followers (every worker has a handle), silent-failure watch and planner (if
attached); `pause()`/`resume()` stop and restart the last two (a sleeping model); `stop()` stops all in reverse, then
lets lease releases finish.  A core never started still serves (DisaggClient, tests), with no deadline timer.
Collaborators (router/attempt.py, router/roles.py, the planner's port) get the parts they use, not the core.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Mapping

from opentelemetry import trace
from opentelemetry.context import Context

from disagg.errors import ServiceUnavailable
from disagg.isolation import affinity, salt_root
from disagg.planner.fleet import FleetConfig, ModelSignal
from disagg.planner.loop import PlannerLoop
from disagg.protocol import KVEventBatch, Request, Role, TokenDelta
from disagg.router.admission import AdmissionConfig, AdmissionControl, AdmissionQueue, CapacityConfig, Entry
from disagg.router.attempt import AttemptRunner
from disagg.router.core_config import RouterCoreConfig
from disagg.router.decision import Decision
from disagg.router.decisions import DecisionLog
from disagg.router.drive import FlightDriver, FlightHooks
from disagg.router.event_follow import EventFollowers
from disagg.router.flight import Flight
from disagg.router.handles import WorkerHandle
from disagg.router.health import HealthConfig, HealthMonitor, Supervisor, WorkerState
from disagg.router.index import Ingest, PrefixIndex
from disagg.router.latency import LatencyWindow
from disagg.router.load import LoadBook, LoadTicket, tier_costs
from disagg.router.native_score import make_router_tables
from disagg.router.parking import Parking
from disagg.router.placement import WorkerTiming
from disagg.router.policy import PolicyConfig, RoutingPolicy, WorkerLoad
from disagg.router.prompt_hash import make_prompt_hasher
from disagg.router.ranking import LoadRanking
from disagg.router.resume import Resumer
from disagg.router.roles import RoleChanger
from disagg.router.watch import SilentConfig, SilentFailureWatch
from disagg.stats import Heartbeat, RouterCounters
from disagg.tracing import inject
from disagg.utils import Background

log = logging.getLogger(__name__)


class RouterCore:
    def __init__(
        self,
        prefill: Mapping[str, WorkerHandle | None],
        decode: Mapping[str, WorkerHandle | None],
        policy: PolicyConfig | None = None,
        block_size: int = 16,
        config: RouterCoreConfig | None = None,
        health: HealthConfig | None = None,
        admission: AdmissionConfig | None = None,
        capacity: CapacityConfig | None = None,
        tracer: trace.Tracer | None = None,
        silent: SilentConfig | None = None,
    ) -> None:
        if not decode:
            raise ValueError("the router needs at least one decode (or aggregated) worker")
        self.prefill, self.decode = dict(prefill), dict(decode)  # routing sets; roles move workers between them
        self.handles: dict[str, WorkerHandle | None] = {**prefill, **decode}
        self.config, self.block_size = config or RouterCoreConfig(), block_size
        self.policy = RoutingPolicy(policy, block_size)
        pc = self.policy.config  # the index, the in-flight blocks, and a scorer over both where they are C++ tables
        table, in_flight, scorer = make_router_tables(self.config.native_index, pc.cpu_load_cost, pc.disk_load_cost)
        self._hash_blocks = make_prompt_hasher(self.config.native_index)  # the workers' block hashes, in one call
        self.index, self.ranking = PrefixIndex(table=table), LoadRanking(pc.queue_weight, block_size, in_flight, scorer)
        self.loads = {name: WorkerLoad(name, ranking=self.ranking) for name in self.handles}
        self.ranking.set_order(self.decode)
        for name in self.loads:
            self.index.add_worker(name)
        decode_role = Role.DECODE if prefill else Role.BOTH
        roles = {**{n: Role.PREFILL for n in prefill}, **{n: decode_role for n in decode}}
        self.health = HealthMonitor(health or HealthConfig(), roles, on_change=self._on_health_change)
        self.supervisor: Supervisor | None = None
        live = {n: h for n, h in self.handles.items() if h is not None}
        if len(live) == len(self.handles):  # only a router with a handle for every worker supervises them
            self.supervisor = Supervisor(
                self.health, live, self.on_kv_events, self.index_needs_snapshot, self.on_heartbeat
            )
        self.events: EventFollowers | None = None  # the workers' KV events, pulled (router/event_follow.py)
        if self.supervisor is not None:
            self.events = EventFollowers(live, self.on_kv_events, self.config.event_poll_s, self.config.event_retry_s)
        silent = silent or SilentConfig()
        self.watch: SilentFailureWatch | None = None  # canaries and gray failures (router/watch.py); off by default
        if self.supervisor is not None and silent.enabled:
            self.watch = SilentFailureWatch(silent, self.health, live, self._busy, self.supervisor.enforce, self.loads)
        self.tracer = tracer or trace.NoOpTracer()
        self.capacity = capacity or CapacityConfig()
        self.admission = AdmissionControl(AdmissionQueue(admission), self._can_dispatch, self._queue_wait)
        self.on_queue_wait: Callable[[float], None] | None = None  # metrics hook (seconds spent queued)
        self._dispatching: str | None = None  # dispatched, not yet counted by begin()
        self.counters = RouterCounters()  # migrations, fallbacks, requests by path, role changes (/metrics)
        self._lock = threading.Lock()
        self.decisions = DecisionLog(self.config.max_decisions, self._lock)  # recent routing decisions
        self.decision_of, self.recent_decisions = self.decisions.of, self.decisions.recent
        self.ingest = Ingest(self.index, self._lock, self.config.ingest_slice_blocks)  # KV events, in slices
        self.book = LoadBook(self.loads, self.health, self.capacity, block_size, prefill, self._lock)
        self.book.flexible = self.policy.config.flexible  # prefill workers may serve requests whole (takers)
        self.latency = LatencyWindow(correction=self.policy.correction)  # TTFT, TPOT; teaches the placement model
        self.roles = RoleChanger(
            self.health, self.loads, self.handles, self.counters, self.set_routing_role, self.config.roles
        )
        # out of routing and asleep for another model's worker (router/parking.py; the fleet planner's moves)
        self.parking = Parking(self.health, self.loads, self.handles, self.roles.in_flight.__contains__)
        p = self.parking
        self.park, self.leave, self.settle = p.park, p.leave, p.settle
        self.wake_parked, self.standby = p.wake, p.standby
        # the worker calls of one attempt (router/attempt.py)
        self.attempts = AttemptRunner(self.handles, self.health, self.counters, self.config)
        self.resumer = Resumer(self.handles, self.health, self.config)  # streams a dead relay started (resume.py)
        self.planner: PlannerLoop | None = None  # attached by the composition root when the service plans roles
        # load accounting and saturation (router/load.py); the simulator and bench/router.py drive them too
        book = self.book
        self.begin, self.progress, self.end, self.has_room = book.begin, book.progress, book.end, book.has_room

    # ------------------------------------------------------------------ lifecycle
    def _background(self, *, pausable: bool = False) -> list[Background]:
        """Its optional background parts in start order (stopped in reverse); `pausable`: the ones a sleep stops."""
        parts = (self.watch, self.planner) if pausable else (self.events, self.supervisor, self.watch, self.planner)
        return [p for p in parts if p is not None]

    def start(self) -> None:
        """Start the background tasks on the running event loop (see the module docstring)."""
        self.admission.start()
        for part in self._background():
            part.start()

    async def stop(self) -> None:
        """Stop them, newest first, then let background lease releases finish (each bounded by release_timeout_s)."""
        for part in reversed(self._background()):
            await part.stop()
        await self.admission.stop()
        await self.parking.stop()
        await self.drain_releases()

    async def pause(self) -> None:
        """Its model sleeps (http/admin_sleep.py): no canaries, no planning; health and KV events go on."""
        self.parking.paused = True
        for part in reversed(self._background(pausable=True)):
            await part.stop()

    def resume(self) -> None:
        self.parking.paused = False
        for part in self._background(pausable=True):
            part.start()

    def unparked(self) -> list[WorkerHandle]:
        """The handles of its workers the fleet has not parked (a model's sleep and wake are theirs)."""
        return [h for n, h in self.handles.items() if h is not None and n not in self.health.parked]

    def fleet_signal(self, model: str, config: FleetConfig, now: float, *, serving: bool) -> ModelSignal:
        """Its workers and demand as the fleet planner reads them (planner/fleet.py)."""
        expected = self.latency.expected_in_flight(config.rate_window_s, config.latency_window_s, now)
        queued, limit = len(self.admission.queue), self.capacity.max_running
        return self.parking.signal(model, queued, limit, expected, serving=serving)

    # ------------------------------------------------------------------ health
    def _on_health_change(self, name: str, old: WorkerState, new: WorkerState) -> None:
        with self._lock:  # requests streaming from a dead worker notice within death_poll_s (see _next)
            if new in (WorkerState.DEAD, WorkerState.STARTING):  # a rejoin rebuilds it from a snapshot
                self.index.remove_worker(name)
            elif new is WorkerState.READY:
                self.index.add_worker(name)

    def _busy(self, name: str) -> bool:
        """Serving requests (canaries then run at their low rate)."""
        return self.loads[name].active_requests > 0

    def on_heartbeat(self, name: str, hb: Heartbeat) -> None:
        """Measured costs from a worker's heartbeat: each tier's load time per block over its prefill time per
        block (the policy treats a tier at >= 1 as worth nothing)."""
        self.roles.reconcile(name, hb.role)
        self.parking.reconcile(name, hb.asleep)
        stats = hb.stats
        if stats is not None:  # a plain assignment: the worker's load terms (the ranking's) are untouched
            self.loads[name].timing = WorkerTiming(
                stats.step_model(), stats.chunk_rule(self.block_size), stats.transfer_s_per_block
            )
        costs = tier_costs(stats, self.block_size) if stats is not None else None
        if costs is not None:
            with self._lock:  # the policy's ranking (router/ranking.py) moves with it
                self.loads[name].tier_cost = costs

    # ------------------------------------------------------------------ roles (router/roles.py drives changes)
    def set_routing_role(self, name: str, role: Role) -> None:
        """Route `name` as `role` from now on: prefill-only workers take remote prefills, the others decode
        (and prefill their own prompts).  Its in-flight work and its load accounting are untouched."""
        with self._lock:
            handle = self.prefill.pop(name) if name in self.prefill else self.decode.pop(name)
            (self.prefill if role is Role.PREFILL else self.decode)[name] = handle
            self.health.workers[name].role = role
            self.book.prefill = list(self.prefill)
            self.ranking.set_order(self.decode)

    def index_needs_snapshot(self, name: str) -> bool:
        with self._lock:
            return self.index.has_worker(name) and self.index.needs_snapshot(name)

    # ------------------------------------------------------------------ KV events
    def on_kv_events(self, batch: KVEventBatch) -> bool:
        """Apply a worker's batch (a gap flags the worker for a snapshot, which the supervisor fetches).
        Batches from workers out of routing are dropped: their index entries were cleared on purpose."""
        if batch.worker not in self.health.workers or self.health.workers[batch.worker].state is WorkerState.DEAD:
            return False
        return self.ingest.apply(batch)

    # ------------------------------------------------------------------ routing
    def block_hashes(self, request: Request) -> list[int]:
        """The request's full blocks (prompt + resumed output), hashed as the workers hash them."""
        tokens = request.prompt_token_ids + request.resume_token_ids
        return self._hash_blocks(tokens, self.block_size, salt_root(request.hash_salt()))

    def route(
        self,
        request: Request,
        session: str | None = None,
        hashes: list[int] | None = None,
        only: Callable[[str], bool] | None = None,
    ) -> Decision:
        """Choose the workers for a request among READY ones (and, with `only`, those it accepts)."""
        hashes = self.block_hashes(request) if hashes is None else hashes
        routable = self.health.routable
        eligible = routable if only is None else (lambda n: routable(n) and only(n))
        prefill = [self.loads[n] for n in self.prefill if routable(n)]
        lora = request.lora
        key = affinity(request.tenant, session, (lora.name, lora.path) if lora is not None else None)
        with self._lock:  # every decode worker scored in one native call, else the likely winners only (ranking.py)
            scored = self.policy.score(self.ranking, hashes, request.num_tokens, key)
            matches = self.index.match(hashes) if scored is None else scored.matches
            if self.health.parked:  # asleep: their tiers offer nothing (export_prefix answers None)
                matches = {n: m for n, m in matches.items() if n not in self.health.parked}
            idle = self.book.takers(eligible, request.num_tokens, self.roles.in_flight)  # flexible workers (or none)
            decision = self.policy.choose_ranked(
                request.num_tokens, matches, self.ranking, self.loads, eligible, prefill, key, hashes, idle, scored
            )
            if decision is None:
                raise ServiceUnavailable("no decode worker is alive; retry shortly", code="no_workers")
            self.decisions.append(request.request_id, decision)
            if decision.priced_from is not None:
                self.counters.placed(decision.priced_from)
        return decision

    # ------------------------------------------------------------------ admission
    def room_for(self, entry: Entry) -> bool:
        """Whether a queued request can be dispatched now: its worker has room (routed on arrival), or any
        decode worker has (routed when dispatched), or, with flexible workers, an idle prefill worker has."""
        if entry.worker is not None:
            return self.has_room(entry.worker, entry.tokens, entry.priority)
        if any(self.has_room(n, entry.tokens, entry.priority) for n in self.decode):
            return True
        takers = self.book.takers(self.health.routable, entry.tokens, self.roles.in_flight, entry.priority)
        return any(p.queued_compute_tokens == 0 for p in takers)  # flexible: an idle one may serve it whole

    def _can_dispatch(self, entry: Entry) -> bool:
        if self._dispatching:  # one at a time: the next waits until this one's load is counted (begin)
            return False
        ok = self.room_for(entry)
        if ok:
            self._dispatching = entry.request_id
        return ok

    def _dispatched(self, request_id: str) -> None:
        if self._dispatching == request_id:
            self._dispatching = None
            self.admission.pump()

    def route_with_room(
        self, request: Request, session: str | None, hashes: list[int], priority: int = 0, avoid: str | None = None
    ) -> Decision:
        """Route among the workers with room (fresh index state), then among every READY worker (none has room any
        more: a worker just died); `avoid` (the worker a migrating request just lost, maybe not yet out of
        routing) is taken only when no other is left."""
        for only in (lambda n: n != avoid and self.has_room(n, request.num_tokens, priority), lambda n: n != avoid):
            try:
                return self.route(request, session, hashes, only=only)
            except ServiceUnavailable:
                continue
        return self.route(request, session, hashes)

    def _queue_wait(self, seconds: float) -> None:
        if self.on_queue_wait is not None:
            self.on_queue_wait(seconds)

    # ------------------------------------------------------------------ serving
    async def generate(
        self,
        request: Request,
        session: str | None = None,
        on_route: Callable[[Decision], None] | None = None,
        tenant: str = "default",
        priority: int = 0,
        deadline_s: float | None = None,
        span: trace.Span | None = None,
    ) -> AsyncGenerator[TokenDelta, None]:
        """Serve a request end to end: wait in the admission queue until a worker has room (or be refused with
        Overloaded), then route, stream, and migrate if its decode worker is lost (see the module docstring).
        `span`: the request's span; the router's stages become its children, the workers' too (its context
        travels in the Request)."""
        if not self.health.any_decoder_ready():
            raise ServiceUnavailable("no decode worker is alive; retry shortly", code="no_workers")
        span = span or trace.INVALID_SPAN
        ctx = trace.set_span_in_context(span)
        if span.is_recording():
            request = dataclasses.replace(request, trace_context=inject(span))
        queue = self.admission.queue
        now = queue.clock()
        self.latency.arrived(now)
        first_decision = await self._wait_in_queue(request, session, tenant, priority, deadline_s, now, ctx)

        def route(attempt: Request, number: int, lost: str | None) -> Decision:
            with self.tracer.start_as_current_span("router.route", context=ctx) as routing:
                if number == 0 and first_decision is not None:
                    decision = first_decision
                else:
                    decision = self.route_with_room(attempt, session, self.block_hashes(attempt), priority, lost)
                if routing.is_recording():
                    routing.set_attributes(decision.span_attributes())
            if on_route is not None:
                on_route(decision)
            return decision

        def begin(decision: Decision, attempt: Request) -> LoadTicket:
            ticket = self.begin(decision, attempt.num_tokens, self.block_hashes(attempt), attempt.output_estimate())
            self._dispatched(request.request_id)  # counted: the admission queue may dispatch the next one
            return ticket

        hooks = FlightHooks(route, begin, self.admission.pump, queue, self.latency, self.book)
        flight = Flight(request, tenant=tenant, arrival=now, max_migrations=self.config.max_migrations)
        try:
            async for delta in FlightDriver(self.attempts, hooks, span).fly(flight):
                yield delta
        finally:
            self._dispatched(request.request_id)
            self.admission.pump()  # its capacity is free again

    async def _wait_in_queue(
        self,
        request: Request,
        session: str | None,
        tenant: str,
        priority: int,
        deadline_s: float | None,
        now: float,
        ctx: Context,
    ) -> Decision | None:
        """Wait in the admission queue until dispatched (Overloaded if refused); the decision made on arrival when
        requests are not routed again on dispatch (`rescore_on_dispatch` off)."""
        queue = self.admission.queue
        limit = min(deadline_s or queue.config.default_deadline_s, queue.config.max_deadline_s)
        entry = Entry(request.request_id, tenant, priority, request.num_tokens, now, now + limit)
        entry.head_start_s = request.queue_head_start_s
        first_decision = None
        if not self.config.rescore_on_dispatch:
            first_decision = self.route(request, session)
            entry.worker = first_decision.decode_worker
        queued = self.tracer.start_span(
            "router.queue", context=ctx, attributes={"disagg.tenant": tenant, "disagg.priority": priority}
        )
        try:
            await self.admission.admit(entry)
        except BaseException as exc:
            self._dispatched(request.request_id)
            queued.set_attribute("disagg.rejected", type(exc).__name__)
            raise
        finally:
            queued.end()
        return first_decision

    async def drain_releases(self) -> None:
        """On shutdown: let background lease releases finish (each is bounded by `release_timeout_s`)."""
        await self.attempts.drain_releases()
