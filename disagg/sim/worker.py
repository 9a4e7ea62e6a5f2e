"""The simulated cluster's moving parts in virtual time: the event loop, a worker (one engine stepping on a
stand-in runner, its KV events and heartbeats), and the peer read that prices a KV transfer.

A worker runs one step at a time: the step's state changes apply when it starts and its tokens are delivered
when its modelled duration has passed (when workers share cores: when its work is done, shared with the steps
that run beside it, sim/cores.py `SharedSteps`; the engine then measures the step's time as it ran).  KV events
reach the router after a configured delay; the heartbeat carries what the router's health probe reads from a
real worker.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

from disagg.engine.engine import LLMEngine
from disagg.kv.connector import KVLoad, LoadState, SourceKind, _Notifier
from disagg.kv.load import handle_of
from disagg.protocol import KVEventBatch, PrefillResult, TokenDelta
from disagg.sim.runner import SimRunner
from disagg.sim.tiers import LandsAt, SimTiers
from disagg.stats import Heartbeat, WorkerStats

if TYPE_CHECKING:
    from disagg.sim.cluster import SimCluster


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._order), fn))

    def pending(self) -> bool:
        return bool(self._queue)

    def run(self, until: float = float("inf")) -> None:
        while self._queue and self._queue[0][0] <= until:
            self.now, _, fn = heapq.heappop(self._queue)
            fn()


class SimWorker:
    def __init__(self, name: str, engine: LLMEngine, runner: SimRunner, cluster: SimCluster) -> None:
        self.name, self.engine, self.runner, self.cluster = name, engine, runner, cluster
        self.busy = False
        self.busy_seconds = 0.0
        self.alive = True
        self.incarnation = 0  # bumped by a kill: callbacks of the dead incarnation are dropped
        self._seq_no = -1
        self.link_free_at = 0.0  # its inbound KV link is busy until then
        self.heartbeat_at = -float("inf")
        self.snapshot_pending = False
        self.tiers: SimTiers | None = None  # its CPU/disk tiers (a restart keeps the disk's contents)

    def kick(self) -> None:
        if not self.alive or self.busy or not self.engine.has_unfinished():
            return
        steps, preemptions = self.engine.stats.steps, self.engine.scheduler.stats.num_preemptions
        deltas = self.engine.step()
        if self.engine.stats.steps == steps:  # no model step ran: KV arrived (its first token goes out now,
            self._publish()  # the model runs on the next kick), a preemption freed memory,
            for delta in deltas:  # or the worker waits for KV or memory (the next event kicks it)
                self.cluster.deliver(self, delta)
            if deltas or self.engine.scheduler.stats.num_preemptions != preemptions:
                self.kick()
            return
        self.busy = True
        incarnation = self.incarnation
        duration = self.runner.last_step_s
        if duration is None:  # shared cores: the step's work shares them with whatever runs beside it, to its end
            record = self.engine.last_step
            assert record is not None, "a model step ran"

            def ended(seconds: float) -> None:
                if incarnation == self.incarnation:  # the engine measures the step as it ran (as a real one does)
                    self.engine.measure(dataclasses.replace(record, execute_s=seconds))
                self._step_done(deltas, incarnation, seconds)

            self.cluster.steps.start(self, self.runner.last_work_s, self.runner.last_tokens, ended)
        else:  # a core of its own: the model's time (SimRunner)
            seconds = duration
            self.cluster.loop.at(self.cluster.loop.now + seconds, lambda: self._step_done(deltas, incarnation, seconds))

    def _step_done(self, deltas: list[TokenDelta], incarnation: int, duration: float) -> None:
        if incarnation != self.incarnation:
            return  # this process was killed mid-step
        self.busy = False
        self.busy_seconds += duration
        self._publish()
        if self.cluster.loop.now - self.heartbeat_at >= self.cluster.config.heartbeat_interval_s:
            self.heartbeat()
        for delta in deltas:
            self.cluster.deliver(self, delta)
        self.kick()

    def heartbeat(self) -> None:
        """What the router's health probe reads from a real worker (cluster/worker.py heartbeat): its KV size
        (the router's KV-room check and the planner's decode KV use divide by it) and measured prefill speed.
        Sent at start and after a step once per heartbeat interval: between steps these figures do not change."""
        e, router = self.engine, self.cluster.router
        stats = WorkerStats(
            kv_blocks_total=e.pool.num_blocks,
            kv_blocks_free=e.pool.num_free_blocks,
            prefill_s_per_token=e.prefill_s_per_token,
            step_s_per_token=e.step_s_per_token,
        )
        stats.set_timing(e.step_fit.model, e.chunk_rule)
        hb = Heartbeat(
            self.name,
            f"sim-{self.incarnation}",
            router.health.role_of(self.name),  # as a real worker reports the role it was given
            0,
            "",
            e.stats.steps,
            e.has_unfinished(),
            0.0,
            0,
            self.name,
            stats=stats,
        )
        self.heartbeat_at = self.cluster.loop.now
        router.health.on_heartbeat(self.name, hb, self.cluster.loop.now)
        router.on_heartbeat(self.name, hb)  # measured costs, as the real supervisor hands them on

    def _publish(self) -> None:
        events = self.engine.drain_kv_events()
        if events:
            self._seq_no += 1
            batch = KVEventBatch.of(self.name, self._seq_no, events)
            self.cluster.send_events(self, batch)


class SimPeerSource(_Notifier):
    """A peer read in virtual time: done after the time model's transfer time; the owner's lease is released
    when the data has landed, as a NIXL notification would."""

    kind = SourceKind.PEER

    def __init__(self, cluster: SimCluster, worker: SimWorker) -> None:
        self.cluster, self.worker = cluster, worker

    def start(self, load: KVLoad) -> None:
        result = load.remote
        assert result is not None, "a peer load carries the owner's offer"
        loop = self.cluster.loop
        start_at = max(loop.now, self.worker.link_free_at) if self.cluster.config.link_contention else loop.now
        done_at = start_at + self.cluster.model.transfer_time(load.num_blocks)
        self.worker.link_free_at = done_at
        self.cluster.counters["transferred_blocks"] += load.num_blocks
        load.handle = LandsAt(done_at)

        incarnation = self.worker.incarnation

        def landed() -> None:
            self.cluster.release_lease(result.agent_name, load.request_id)
            if self.worker.incarnation == incarnation:
                self.worker.kick()

        loop.at(done_at, landed)

    def poll(self, load: KVLoad) -> LoadState:
        if self.cluster.loop.now < handle_of(load, LandsAt).at:
            return LoadState.PENDING
        load.num_ok_blocks = load.num_blocks
        return LoadState.DONE

    def abandon(self, load: KVLoad) -> bool:
        return True

    def notify_done(self, result: PrefillResult, request_id: str) -> None:
        self.cluster.release_lease(result.agent_name, request_id)
