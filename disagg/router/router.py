"""Router core: worker registry and health, KV index upkeep, per-request routing, load accounting (router/load.py), and
serving a request through its workers with fallbacks and migration.

No Ray and no HTTP here: workers are `WorkerHandle`s (router/handles.py).  Thread-safe (one lock): the HTTP
server's event loop routes requests while the router actor's threads apply KV event batches.

Serving one request (`generate`):
  1. route it (only READY workers count); no decode-capable worker READY -> ServiceUnavailable (503);
  2. remote prefill on the chosen prefill worker, with a deadline; if it fails or times out the decode worker
     prefills locally (and the prefill worker's lease, if any, is released) - or, when the policy chose a peer
     pull, the peer's cached prefix is offered to the decode worker;
  3. stream from the decode worker: the first delta within `stream_start_timeout_s`; while streaming, the
     worker's death (the health supervisor takes it out of routing) or a broken stream raises WorkerLost;
  4. on WorkerLost the request migrates: routed again as prompt + the tokens the client already has
     (`Request.resumed`), so the stream continues with no duplicate and no missing token, up to
     `max_migrations` times; then, or when no decode-capable worker is left, ServiceUnavailable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from disagg.errors import DeadlineExceeded, InvalidRequest, ServiceUnavailable, TransferFailed, WorkerLost
from disagg.protocol import (
    Heartbeat,
    KVEventBatch,
    PrefillResult,
    Request,
    Role,
    Tier,
    TokenDelta,
    hash_prompt_blocks,
)
from disagg.router.admission import AdmissionConfig, AdmissionControl, AdmissionQueue, CapacityConfig, Entry
from disagg.router.handles import WorkerHandle
from disagg.router.health import HealthConfig, HealthMonitor, Supervisor, WorkerState
from disagg.router.index import PrefixIndex
from disagg.router.load import LatencyWindow, LoadBook, LoadTicket
from disagg.router.policy import Decision, PolicyConfig, RoutingPolicy, WorkerLoad
from disagg.router.roles import RoleChanger
from disagg.tracing import inject

log = logging.getLogger(__name__)


@dataclass
class RouterCoreConfig:
    rescore_on_dispatch: bool = True  # a queued request is routed when it leaves the queue (fresh index state)
    prefill_timeout_s: float = 120.0  # remote prefill not answered by then: the decode worker prefills locally
    export_timeout_s: float = 5.0  # a peer's prefix offer
    stream_start_timeout_s: float = 300.0  # first delta from the decode worker (its queue included)
    release_timeout_s: float = 5.0
    max_background_releases: int = 4096  # lease releases in flight off the request path (then callers wait)
    max_migrations: int = 3  # per request; then the client gets an explicit error
    max_decisions: int = 10_000  # bound of the decision log
    death_poll_s: float = 0.05  # how often a streaming request checks that its worker is still in routing


@dataclass
class RoutedRequest:
    request_id: str
    decision: Decision


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
    ) -> None:
        if not decode:
            raise ValueError("the router needs at least one decode (or aggregated) worker")
        self.prefill, self.decode = dict(prefill), dict(decode)  # routing sets; roles move workers between them
        self.handles: dict[str, WorkerHandle | None] = {**prefill, **decode}
        self.config = config or RouterCoreConfig()
        self.block_size = block_size
        self.policy = RoutingPolicy(policy, block_size)
        self.index = PrefixIndex()
        self.loads = {name: WorkerLoad(name) for name in self.handles}
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
        self.tracer = tracer or trace.NoOpTracer()
        self.capacity = capacity or CapacityConfig()
        self.admission = AdmissionControl(AdmissionQueue(admission), self._can_dispatch, self._queue_wait)
        self.on_queue_wait: Callable[[float], None] | None = None  # metrics hook (seconds spent queued)
        self._dispatching: str | None = None  # dispatched, not yet counted by begin()
        self.decisions: deque[RoutedRequest] = deque(maxlen=self.config.max_decisions)
        self.counters: Counter = Counter()  # migrations, fallbacks, requests by path (see telemetry)
        self._lock = threading.Lock()
        self._releases: dict[str, asyncio.Task] = {}  # background lease releases by request id, until done
        self.book = LoadBook(self.loads, self.health, self.capacity, block_size, prefill, self._lock)
        self.latency = LatencyWindow()  # per finished request: TTFT, TPOT (the planner's SLO attainment)
        self.roles = RoleChanger(self)
        self.planner: Any = None  # a PlannerLoop (disagg/planner/) when the service runs one
        # load accounting and saturation (router/load.py); the simulator and bench/router.py drive them too
        self.begin, self.progress, self.end, self.has_room = (
            self.book.begin,
            self.book.progress,
            self.book.end,
            self.book.has_room,
        )

    # ------------------------------------------------------------------ health
    def _on_health_change(self, name: str, old: WorkerState, new: WorkerState) -> None:
        with self._lock:  # requests streaming from a dead worker notice within death_poll_s (see _next)
            if new is WorkerState.DEAD:
                self.index.remove_worker(name)
            elif new is WorkerState.READY:
                self.index.add_worker(name)

    def on_heartbeat(self, name: str, hb: Heartbeat) -> None:
        """Measured costs from a worker's heartbeat: each tier's load time per block over its prefill time per
        block (the policy treats a tier at >= 1 as worth nothing)."""
        self.roles.reconcile(name, hb.role)
        per_token = hb.gauges.get("prefill_s_per_token")
        if not per_token:
            return
        recompute = per_token * self.block_size
        costs = {}
        for tier in (Tier.CPU, Tier.DISK):
            load = hb.gauges.get(f"tier_load_s_per_block:{tier.value}")
            if load is not None:
                costs[tier] = load / recompute
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

    def index_needs_snapshot(self, name: str) -> bool:
        with self._lock:
            return self.index.has_worker(name) and self.index.needs_snapshot(name)

    # ------------------------------------------------------------------ KV events
    def on_kv_events(self, batch: KVEventBatch) -> bool:
        """Apply a worker's batch (a gap flags the worker for a snapshot, which the supervisor fetches).
        Batches from workers out of routing are dropped: their index entries were cleared on purpose."""
        if batch.worker not in self.health.workers or self.health.workers[batch.worker].state is WorkerState.DEAD:
            return False
        with self._lock:
            return self.index.apply(batch)

    # ------------------------------------------------------------------ routing
    def block_hashes(self, request: Request) -> list[int]:
        """The request's full blocks (prompt + resumed output), hashed as the workers hash them."""
        return hash_prompt_blocks(request.prompt_token_ids + request.resume_token_ids, self.block_size)

    def route(
        self,
        request: Request,
        session: str | None = None,
        hashes: list[int] | None = None,
        only: Callable[[str], bool] | None = None,
    ) -> Decision:
        """Choose the workers for a request among READY ones (and, with `only`, those it accepts)."""
        hashes = self.block_hashes(request) if hashes is None else hashes
        decode = [self.loads[n] for n in self.decode if self.health.routable(n) and (only is None or only(n))]
        if not decode:
            raise ServiceUnavailable("no decode worker is alive; retry shortly", code="no_workers")
        prefill = [self.loads[n] for n in self.prefill if self.health.routable(n)]
        with self._lock:
            matches = self.index.match(hashes)
            decision = self.policy.choose(request.num_tokens, matches, decode, prefill, session, frozenset(hashes))
            self.decisions.append(RoutedRequest(request.request_id, decision))
        return decision

    # ------------------------------------------------------------------ admission
    def room_for(self, entry: Entry) -> bool:
        """Whether a queued request can be dispatched now: its worker has room (routed on arrival), or any
        decode worker has (routed when dispatched)."""
        if entry.worker is not None:
            return self.has_room(entry.worker, entry.tokens, entry.priority)
        return any(self.has_room(n, entry.tokens, entry.priority) for n in self.decode)

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

    def route_with_room(self, request: Request, session: str | None, hashes: list[int], priority: int = 0) -> Decision:
        """Route among the workers with room (fresh index state); if none has room any more (a worker just
        died), among every READY worker."""
        try:
            return self.route(request, session, hashes, only=lambda n: self.has_room(n, request.num_tokens, priority))
        except ServiceUnavailable:
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
        limit = min(deadline_s or queue.config.default_deadline_s, queue.config.max_deadline_s)
        entry = Entry(request.request_id, tenant, priority, request.num_tokens, now, now + limit)
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
        sent: list[int] = []
        sent_chars = 0
        first_at: float | None = None
        attempt = request
        try:
            for migration in range(self.config.max_migrations + 1):
                hashes = self.block_hashes(attempt)
                with self.tracer.start_as_current_span("router.route", context=ctx) as routing:
                    if migration == 0 and first_decision is not None:
                        decision = first_decision
                    else:
                        decision = self.route_with_room(attempt, session, hashes, priority)
                    if routing.is_recording():
                        routing.set_attributes(decision.span_attributes())
                if on_route is not None:
                    on_route(decision)
                ticket = self.begin(decision, attempt.num_tokens, hashes)
                self._dispatched(request.request_id)
                try:
                    async for delta in self._serve(attempt, decision, ticket, migrated=migration > 0, span=span):
                        first_at = first_at or queue.clock()
                        sent += delta.token_ids
                        sent_chars += len(delta.text)
                        queue.charge(tenant, len(delta.token_ids))
                        yield delta
                    self.latency.record(now, first_at or queue.clock(), queue.clock(), len(sent))
                    return
                except WorkerLost as exc:
                    log.warning(
                        "request %s lost %s after %d tokens (%s)",
                        request.request_id,
                        decision.decode_worker,
                        len(sent),
                        exc.message,
                    )
                    self.counters["migrations"] += 1
                    span.add_event(
                        "migration", {"disagg.worker": decision.decode_worker, "disagg.tokens_delivered": len(sent)}
                    )
                    attempt = request.resumed(sent, sent_chars)
                finally:
                    self.end(ticket)
            raise ServiceUnavailable(
                f"request lost its worker {self.config.max_migrations + 1} times; giving up", code="migration_limit"
            )
        finally:
            self._dispatched(request.request_id)
            self.admission.pump()  # its capacity is free again

    async def _serve(
        self,
        request: Request,
        decision: Decision,
        ticket: LoadTicket,
        migrated: bool,
        span: trace.Span = trace.INVALID_SPAN,
    ) -> AsyncGenerator[TokenDelta, None]:
        decode = self._handle(decision.decode_worker)
        if (pending := self._releases.get(request.request_id)) is not None:
            await pending  # a migrated request's earlier lease goes first: a late release would free the new one
        remote, owner = await self._remote_kv(request, decision, span)
        if migrated:
            path = "migrated"
        elif remote is None:
            path = "fallback" if (decision.prefill_worker or decision.peer_worker) else "local"
        else:
            path = "disaggregated" if decision.prefill_worker else "peer_prefix"
        self.counters[f"path:{path}"] += 1
        stream = decode.generate(request, remote)
        timeout: float | None = self.config.stream_start_timeout_s
        generated = 0
        try:
            while True:
                delta = await self._next(stream, timeout, decision.decode_worker)
                timeout = None
                generated += len(delta.token_ids)
                self.progress(ticket, generated)
                if generated == len(delta.token_ids):
                    self.admission.pump()  # the prompt left the prefill queue
                yield delta
                if delta.finished:
                    return
        finally:
            await stream.aclose()
            if owner is not None:
                await self._release_soon(owner, request.request_id)

    async def _next(self, stream: AsyncGenerator[TokenDelta, None], timeout: float | None, worker: str) -> TokenDelta:
        """The next delta; WorkerLost if the worker is taken out of routing meanwhile, the stream breaks, or the
        first delta does not come within `timeout`."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        step = asyncio.ensure_future(stream.__anext__())
        try:
            while True:
                if self.health.workers[worker].state is WorkerState.DEAD:
                    raise WorkerLost(f"{worker} died while streaming", worker=worker)
                wait = self.config.death_poll_s
                if deadline is not None:
                    wait = min(wait, deadline - asyncio.get_running_loop().time())
                    if wait <= 0:
                        raise WorkerLost(
                            f"no first token from {worker} within {timeout:.0f}s",
                            worker=worker,
                            code="stream_start_timeout",
                        )
                done, _ = await asyncio.wait({step}, timeout=wait)
                if done:
                    try:
                        return step.result()
                    except StopAsyncIteration:
                        raise WorkerLost(f"{worker} ended the stream early", worker=worker) from None
        finally:
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)

    async def _while_alive(self, call, worker: str):
        """Await a worker call, giving up with WorkerLost as soon as the worker is taken out of routing (a hung
        worker's call would otherwise sit out its whole deadline)."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.config.death_poll_s)
                if done:
                    return task.result()
                if self.health.workers[worker].state is WorkerState.DEAD:
                    raise WorkerLost(f"{worker} died during the call", worker=worker)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _handle(self, name: str) -> WorkerHandle:
        handle = self.handles[name]
        if handle is None:
            raise ServiceUnavailable(f"worker {name} has no handle (a routing-only router)", code="no_handle")
        return handle

    async def _remote_kv(
        self, request: Request, decision: Decision, span: trace.Span = trace.INVALID_SPAN
    ) -> tuple[Any, WorkerHandle | None]:
        """The KV another worker contributes: a remote prefill's result, or a peer's cached prefix (or none)."""
        name = decision.prefill_worker or decision.peer_worker
        if name is None:
            return None, None
        handle = self._handle(name)
        try:
            call: Awaitable[PrefillResult | None]
            if decision.prefill_worker:
                call = handle.prefill(request, self.config.prefill_timeout_s)
            else:
                call = handle.export_prefix(request, self.config.export_timeout_s)
            result = await self._while_alive(call, name)
        except InvalidRequest:
            raise
        except (WorkerLost, DeadlineExceeded, TransferFailed) as exc:
            kind = "prefill" if decision.prefill_worker else "peer_prefix"
            self.counters[f"fallback:{kind}"] += 1
            span.add_event("fallback", {"disagg.kind": kind, "disagg.worker": name, "disagg.error": exc.message})
            log.warning(
                "%s on %s failed for %s (%s); computing on %s",
                kind,
                name,
                request.request_id,
                exc.message,
                decision.decode_worker,
            )
            await self._release_soon(handle, request.request_id)
            return None, None
        return result, (handle if result is not None else None)

    async def _release_soon(self, handle: WorkerHandle, request_id: str) -> None:
        """Release off the request's path: the owner answers between engine steps (seconds, with long prefills
        in them), and the client's last chunk or its local-prefill fallback must not wait for that.  Bounded:
        past `max_background_releases` in flight, the caller waits for this one."""
        if len(self._releases) >= self.config.max_background_releases:
            await self._release(handle, request_id)
            return
        task = asyncio.get_running_loop().create_task(self._release(handle, request_id))
        self._releases[request_id] = task
        task.add_done_callback(
            lambda t: self._releases.pop(request_id, None) if self._releases.get(request_id) is t else None
        )

    async def drain_releases(self) -> None:
        """On shutdown: let background releases finish (each is bounded by `release_timeout_s`)."""
        await asyncio.gather(*self._releases.values(), return_exceptions=True)

    async def _release(self, handle: WorkerHandle, request_id: str) -> None:
        """Best effort: normally the read's notification already released it; a dead owner's lease died with it."""
        try:
            await asyncio.wait_for(handle.release(request_id), self.config.release_timeout_s)
        except (WorkerLost, DeadlineExceeded, asyncio.TimeoutError) as exc:
            log.info("release of %s on %s: %s", request_id, handle.name, exc)

    # ------------------------------------------------------------------ introspection
    def decision_of(self, request_id: str) -> Decision | None:
        with self._lock:
            for routed in reversed(self.decisions):  # recent requests sit at the end
                if routed.request_id == request_id:
                    return routed.decision
        return None

    def recent_decisions(self, n: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self.decisions)[-n:]
        return [
            {
                "request_id": r.request_id,
                "decode": r.decision.decode_worker,
                "prefill": r.decision.prefill_worker,
                "overlap_blocks": r.decision.overlap_blocks,
                "reason": r.decision.reason,
                "peer": r.decision.peer_worker,
                "device_blocks": r.decision.match.device,
                "cpu_blocks": r.decision.match.cpu,
                "disk_blocks": r.decision.match.disk,
            }
            for r in items
        ]
