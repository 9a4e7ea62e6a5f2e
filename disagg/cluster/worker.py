"""An engine worker as an asyncio service: the body of the Ray actor (Ray-free, so it can be driven directly).

All engine and transport calls run on one executor thread, in order, so the engine is never touched
concurrently; the event loop only routes TokenDeltas to per-request queues and answers heartbeats (without
waiting for the engine thread, so a stuck step still gets reported).  The transport and the KV tiers are
injected (factories), so tests can run a worker on in-process fakes.

Roles (a Role, fixed per worker):
  prefill  `prefill()` runs a request to its first token and leases the blocks until the reader has read them
           (its NIXL notification) or the lease expires.
  decode   `generate(request, remote)` reads the blocks it lacks from the owner named in `remote` (through the
           engine's KV connector, as a scheduler state), then decodes and streams; a failed or timed-out read
           falls back to computing locally.
  both     `generate(request)` with no remote KV: an ordinary aggregated engine.
`generate`, `attach` and `abort` stream through a TokenJournal (cluster/streams.py), so a stream outlives its relay.
Any role can `export_prefix()`: lease the blocks of a prompt prefix it holds (device or CPU tier) for a peer.

Lifecycle: constructed (engine loaded, KV memory registered with a new NIXL agent named after this incarnation)
-> `ready()` starts the step loop -> the router's supervisor wires peers (`set_peers`) and pulls a KV snapshot
-> serving; routers follow its KV events (`kv_events`: cluster/event_feed.py).  A process that dies is restarted
by Ray and goes through the same steps as a new incarnation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from disagg.cluster.event_feed import EventFeed
from disagg.cluster.spans import WorkerSpans
from disagg.cluster.step_budget import StepBudget
from disagg.cluster.streams import JournaledStreams
from disagg.cluster.worker_config import FaultOrder, WorkerConfig, build_tiers, kv_fingerprint
from disagg.cluster.worker_stats import LoopCounts, worker_stats
from disagg.engine.sleep import Sleeper
from disagg.errors import Forbidden, ModelUnavailable, OutputCorrupt
from disagg.protocol import EventKind, KVEvent, KVEventBatch, Request, Role, TokenDelta
from disagg.stats import Heartbeat, WorkerStats
from disagg.tracing import TracingConfig

# The engine, the KV tiers and the transport (torch, NIXL) load when a worker is built, not when this module is
# imported: Ray imports an actor's module wherever a handle to it is made, and the router process must stay
# torch-free (tests/test_http_api.py checks the live process).
if TYPE_CHECKING:
    from disagg.engine.engine import LLMEngine
    from disagg.engine.faults import OutputFault
    from disagg.kv.store import TieredStore
    from disagg.transfer.base import KVTransport

log = logging.getLogger(__name__)


class EngineWorker(JournaledStreams):
    def __init__(
        self,
        config: WorkerConfig,
        transport_factory: Callable[[str, LLMEngine], KVTransport] | None = None,
        tier_factory: Callable[[LLMEngine, WorkerConfig, str], TieredStore | None] = build_tiers,
    ) -> None:
        from disagg.cluster.image_resolver import ImageResolver
        from disagg.engine.engine import LLMEngine
        from disagg.kv.peer import PeerSource
        from disagg.transfer.factory import nixl_transport, resolve_wrapper

        self.config = config
        self.incarnation = uuid.uuid4().hex[:8]
        self.agent_name = f"{config.name}-{self.incarnation}"
        engine_config = dataclasses.replace(config.engine, kv_load_timeout_s=config.transfer_timeout_s)
        if config.mock is None:
            self.engine = LLMEngine(engine_config)
        else:  # the simulator's model behind this real worker (cluster/mocker.py)
            from disagg.cluster.mocker import mock_engine

            self.engine = mock_engine(engine_config, config.mock)
        fingerprint = kv_fingerprint(self.engine)  # the tiers' directory and the layout peers check
        self.tiers = tier_factory(self.engine, config, fingerprint)
        if transport_factory is None:  # NIXL, configured by the worker's config
            transport = nixl_transport(self.agent_name, self.engine.device, config.transport)
        else:
            transport = transport_factory(self.agent_name, self.engine)
        if config.transport_wrapper:
            transport = resolve_wrapper(config.transport_wrapper)(transport)
        self.transport: KVTransport = transport
        kv = self.engine.kv_tensor
        assert kv is not None  # a worker's engine has KV memory (a mock's is a token one: cluster/mocker.py)
        self.transport.register(kv, self.tiers.cpu.tensor if self.tiers is not None else None, fingerprint=fingerprint)
        self.peer = PeerSource(self.transport)
        self.connector = self.engine.connector  # both sides of the KV seam: loads in, leases out
        self.connector.attach(peer=self.peer, tiers=self.tiers)
        self.spans = WorkerSpans(config.name, config.role, config.tracing or TracingConfig())
        if self.spans.enabled:
            self.engine.on_finish = self.spans.record
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{config.name}")
        self._queues: dict[str, asyncio.Queue[TokenDelta | BaseException]] = {}  # prefills in flight
        JournaledStreams.__init__(self)  # generated requests stream through its journal
        self._loop_task: asyncio.Task | None = None
        self._wake = asyncio.Event()  # set when work is submitted: ends an idle wait
        self._idle_s = config.idle_sleep_s
        self.feed = EventFeed(self.incarnation, config.event_feed_batches)  # routers pull KV events from it
        self._event_seq = -1
        self._step_started: float | None = None
        self._steps = 0
        self.budget = StepBudget(
            config.name, config.step_failure_budget, config.failure_backoff_s, config.max_backoff_failures
        )
        self.node_id = ""
        self.counts = LoopCounts()
        self._stats: WorkerStats | None = None  # refreshed by the engine thread, read by heartbeats
        self._stats_at = 0.0
        self.fault: str | None = None  # impossible output seen (NaN logits, bad token id): out of service for good
        self.sleeper = Sleeper(self.engine, config.name)  # KV memory given back while its model sleeps
        self.images = None if config.mock else ImageResolver.for_model(engine_config.model, config.image_cache_bytes)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    def _ensure_loop(self) -> None:
        if self.budget.healthy and (self._loop_task is None or self._loop_task.done()):  # gave up: never again
            self._wake = asyncio.Event()  # one per loop task: an event waited on binds to its event loop
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _submit(self, fn: Callable[[], Any]) -> None:
        """Hand the engine new work (on its thread) and wake a loop that waits for some."""
        await self._call(fn)
        self._wake.set()

    async def _idle(self) -> None:
        """A tick delivered nothing.  An engine with requests (a prefill chunk ran, a KV read is in flight) ticks
        again after idle_sleep_s; an engine with none waits longer each time, up to idle_max_sleep_s, and wakes at
        once when work is submitted: an idle worker must not burn a core polling (workers share the machine's
        cores with each other), while leases are still released and reads polled at that pace."""
        if self.engine.has_unfinished():
            self._idle_s = self.config.idle_sleep_s
        else:
            self._idle_s = min(max(self._idle_s, self.config.idle_sleep_s) * 2, self.config.idle_max_sleep_s)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._idle_s)

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before the tick: work submitted during it wakes the wait that follows
            try:
                deltas, events, faults = await self._call(self._tick)
                self.budget.ok()
            except Exception as exc:  # reported through heartbeats; the supervisor restarts a worker that keeps failing
                self.counts.step_failures += 1
                backoff = self.budget.failed(exc)
                if backoff is None:  # past its budget: nothing waits on a loop that cannot serve it any more
                    for waiting in self._queues.values():
                        waiting.put_nowait(self.budget.lost())
                    self.journal.fail_all(self.budget.lost())
                    return
                deltas, events, faults = [], None, []
                await asyncio.sleep(backoff)
            if events is not None:
                await self.feed.append(events)
                self.counts.events_published += 1
            self._fail_corrupt(faults)
            for delta in deltas:
                queue = self._queues.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
                else:
                    self.journal.append(delta)
            if not deltas:
                await self._idle()

    def _fail_corrupt(self, faults: list[OutputFault]) -> None:
        """Fail the requests whose output was impossible (retried elsewhere); then stop serving (it is restarted)."""
        for fault in faults:
            if self.fault is None:
                self.fault = f"impossible output for {fault.request_id}: {fault.reason}"
                log.error("%s: %s; out of service until restarted", self.config.name, self.fault)
            queue = self._queues.get(fault.request_id)
            if queue is not None:
                queue.put_nowait(self._corrupt())
            self.journal.fail(fault.request_id, self._corrupt())

    def _corrupt(self) -> OutputCorrupt:
        return OutputCorrupt(f"{self.config.name}: {self.fault}", worker=self.config.name)

    def _tick(self) -> tuple[list[TokenDelta], KVEventBatch | None, list[OutputFault]]:
        """Executor thread: release leases readers are done with, expire stale ones, run one step, and collect
        the KV events since the last tick as one numbered batch."""
        for message in self.transport.notifications():
            self.connector.release_lease(message.decode())
        self.connector.expire_leases()
        self._step_started = started = time.monotonic()
        steps = self.engine.stats.steps
        try:
            deltas = self.engine.step()
        finally:
            self._step_started = None
        self._steps += 1
        if self.spans.enabled and self.engine.stats.steps != steps and self.engine.last_step is not None:
            self.spans.step(self.engine.last_step, started, time.monotonic())
        if time.monotonic() - self._stats_at > self.config.metrics_interval_s:
            self._stats = self._build_stats()  # read by heartbeats from the event loop
            self._stats_at = time.monotonic()
        events = self.engine.drain_kv_events()
        batch = None
        if events:  # numbered: a router that missed one sees the gap and asks for a snapshot
            self._event_seq += 1
            batch = KVEventBatch.of(self.config.name, self._event_seq, events)
        return deltas, batch, self.engine.drain_output_faults()

    # ------------------------------------------------------------------ control plane (msgpack in and out)
    async def ready(self) -> str:
        self._ensure_loop()
        return self.config.name

    def heartbeat(self) -> bytes:
        """Answered on the event loop, never waiting for the engine thread."""
        self._ensure_loop()
        e = self.engine
        started = self._step_started
        return Heartbeat(
            worker=self.config.name,
            incarnation=self.incarnation,
            role=self.config.role,
            pid=os.getpid(),
            node_id=self.node_id,
            steps=self._steps,
            has_work=e.has_unfinished(),
            step_busy_s=time.monotonic() - started if started is not None else 0.0,
            consecutive_step_failures=self.budget.failures,
            agent_name=self.agent_name,
            stats=self._stats,
            healthy=self.budget.healthy and self.fault is None,
            fault=self.fault or "",
            asleep=self.sleeper.asleep,
        ).to_wire()

    def _build_stats(self) -> WorkerStats:
        """Engine thread only (cluster/worker_stats.py)."""
        stats = worker_stats(self.engine, self.transport, self.peer, self.tiers, self.counts, self._steps)
        if self.images is not None:
            stats.images_received, stats.images_encoded = self.images.received, self.images.encoded
            stats.images_encoded_as_encoder = self.images.encoded_as_encoder
        return stats

    async def layout(self) -> bytes:
        return self.transport.layout().to_wire()

    async def set_peers(self, layouts: list[bytes]) -> None:
        from disagg.transfer.base import KVLayout

        await self._call(self.transport.set_peers, [KVLayout.from_wire(b) for b in layouts])

    async def set_role(self, role: str) -> None:
        """The router moved this worker to `role` (router/roles.py): heartbeats and spans say so from now on.
        The engine serves every kind of call whatever the role; the router decides which ones it gets."""
        self.config.role = Role(role)
        self.spans.role = self.config.role
        log.info("%s: role is now %s", self.config.name, role)

    async def kv_events(self, incarnation: str, after_seq: int, timeout_s: float) -> bytes:
        """A router's long poll of this worker's KV events (a KVEventPage message; cluster/event_feed.py)."""
        return (await self.feed.since(incarnation, after_seq, timeout_s)).to_wire()

    async def kv_snapshot(self) -> bytes:
        """Every block hash held now, per tier, numbered as the last batch published (events are idempotent)."""

        def snapshot() -> bytes:
            events = [KVEvent(EventKind.STORED, hashes, tier=tier) for tier, hashes in self.engine.kv_hashes().items()]
            return KVEventBatch.of(self.config.name, self._event_seq, events, snapshot=True).to_wire()

        return await self._call(snapshot)

    async def prefill(self, request: bytes) -> bytes:
        """Run the prompt to its first token; the blocks stay leased for the decode worker."""
        received = time.monotonic()  # the engine thread may be mid-step: waiting for it is queueing here
        req = Request.from_wire(request)
        queue = self._open(req.request_id)
        try:
            first = dataclasses.replace(req.sampling, max_tokens=len(req.resume_token_ids) + 1, stop=[])
            await self._submit(
                lambda: self._add(dataclasses.replace(req, sampling=first), hold_kv=True, arrival_time=received)
            )
            delta = await self._get(queue)
        finally:
            self._queues.pop(req.request_id, None)
        # read on the event loop, not behind the engine thread's next step (seconds, with long prefills in it):
        # the step that produced `delta` created the lease, and only the engine thread removes leases (when the
        # reader is done, or after their TTL), so this dict lookup and copy of immutable lists cannot race
        result = self.connector.prefill_result(
            req.request_id,
            self.agent_name,
            delta.token_ids[0],
            None,
            delta.num_cached_tokens,
            first_logprobs=delta.logprobs[0] if delta.logprobs else None,
        )
        return result.to_wire()

    async def export_prefix(self, request: bytes) -> bytes | None:
        """Lease the leading blocks of the request's prompt held here (device or CPU tier) for a peer's read."""
        req = Request.from_wire(request)
        if self.sleeper.asleep:  # its KV pages are given back: nothing to offer
            return None

        def export() -> bytes | None:
            from disagg.isolation import salt_root
            from disagg.protocol import hash_prompt_blocks

            tokens = req.prompt_token_ids + req.resume_token_ids
            usable = (len(tokens) - 1) // self.engine.config.block_size
            hashes = hash_prompt_blocks(tokens, self.engine.config.block_size, salt_root(req.hash_salt()))[:usable]
            result = self.connector.export_prefix(req.request_id, hashes, self.agent_name)
            return result.to_wire() if result is not None else None

        return await self._call(export)

    async def release(self, request_id: str) -> bool:
        """Free a request's leased blocks now (cancellation, or the reader fell back)."""
        return await self._call(self.connector.release_lease, request_id)

    async def _get(self, queue: asyncio.Queue) -> TokenDelta:
        item = await queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _check_serving(self) -> None:
        self.budget.check()
        if self.fault is not None:
            raise self._corrupt()
        if self.sleeper.asleep:  # the front door refuses its model's requests first; this is the backstop
            raise ModelUnavailable(f"{self.config.name} is asleep (POST /admin/models/<id>/wake)", code="asleep")
        self._ensure_loop()

    def _open(self, request_id: str) -> asyncio.Queue:
        self._check_serving()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()  # bounded by the request's max_tokens (one delta per token)
        self._queues[request_id] = queue
        return queue

    # ------------------------------------------------------------------ operations
    def pid(self) -> int:
        return os.getpid()

    def inject_fault(self, fault: str, count: int = 1, hang_s: float = 30.0) -> None:
        from disagg.transfer.factory import FaultInjector

        if not isinstance(self.transport, FaultInjector):
            raise ValueError("this worker's transport injects no faults (WorkerConfig.transport_wrapper)")
        self.transport.inject(fault, count, hang_s)

    async def set_faults(self, order: bytes) -> None:
        """Chaos drills: inject a FaultOrder's engine faults from the next step on (wrong weights, NaN logits, slow
        steps), on this incarnation only (a restart comes back clean).  Refused unless the worker was started with
        `allow_fault_injection`: a serving cluster must not be corruptible by whoever can call its actors."""
        if not self.config.allow_fault_injection:
            raise Forbidden(f"{self.config.name}: fault injection is off (WorkerConfig.allow_fault_injection)")
        from disagg.engine.runner import ModelRunner

        runner, faults = self.engine.runner, FaultOrder.from_wire(order).faults
        if not isinstance(runner, ModelRunner):
            raise ValueError(f"{self.config.name}: its engine runs no model to inject faults into")
        await self._call(runner.set_faults, faults)
        log.warning("%s: injected faults now %s", self.config.name, faults)

    async def stats(self) -> bytes:
        """This worker's figures now (a `WorkerStats` message, the heartbeat's assembly, measured afresh)."""
        return (await self._call(self._build_stats)).to_wire()

    async def clear_device_cache(self) -> bool:
        """Drop the device prefix cache (refused while blocks are in use); the tiers keep what they hold."""
        return await self._call(self.engine.pool.reset_prefix_cache)

    async def flush_tiers(self) -> None:
        """Wait for the tiers' stores and demotions in flight (tests, benchmarks)."""
        if self.tiers is not None:
            await self._call(self.tiers.flush)

    async def sleep(self) -> bytes:
        """Give the KV memory back (engine/sleep.py; refused while blocks are in use): a SleepReport."""
        return (await self._call(self.sleeper.sleep)).to_wire()

    async def wake(self) -> bytes:
        return (await self._call(self.sleeper.wake)).to_wire()

    async def kv_block_bytes(self) -> int:
        return self.transport.layout().block_bytes
