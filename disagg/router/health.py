"""Worker liveness: heartbeats, actor death, stuck or failing step loops -> out of routing, restart, rejoin.

`HealthMonitor` is the pure state machine (clock injected, unit-tested without a cluster); `Supervisor` runs it:
one probe loop per worker on the router's event loop, calling the worker's `heartbeat` through its handle.

    READY    --heartbeat fails: worker dead (actor died)------------------> DEAD
    READY    --no heartbeat for liveness_timeout_s (hung, SIGSTOP)--------> DEAD
    READY    --step running > stuck_step_s, or max_step_failures failed-> DEAD + kill
    READY    --the worker reports itself unhealthy (gave up, or its output was impossible)-> DEAD + kill
    READY    --a request failed with OutputCorrupt (`take_out`)----------> DEAD (its next heartbeat: kill)
    READY    --a wrong canary answer (router/canary.py: `condemn`)------> DEAD + kill
    READY    --an outlier among its peers (router/outliers.py: `drain`)-> DRAINED (streams finish, no new work)
    DRAINED  --no longer an outlier (`undrain`)--------------------------> READY
    DEAD     --still no heartbeat after restart_after_s-----------------> kill (once per incarnation)
    any      --heartbeat from a new incarnation (restarted)-------------> STARTING: rewire NIXL peers, snapshot
    STARTING --rewired and snapshot applied-----------------------------> READY
    DEAD     --the same incarnation answers again (it was only slow)----> STARTING (its index was dropped)

The observer can stall too (router/local_pause.py): a heartbeat that timed out while the router itself was paused
is not judged, and the pause's length is not counted as any worker's silence.

Restarts are Ray's (worker actors have max_restarts): a dead process comes back by itself with a new
incarnation; the supervisor only kills processes that are alive but useless (hung, stuck, failing) so that Ray
restarts them.  Entering DEAD takes the worker out of routing and out of the prefix index at once and wakes the
requests streaming from it, which migrate (see router.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from disagg.errors import DeadlineExceeded, DisaggError, WorkerLost
from disagg.protocol import KVEventBatch, Role, WorkerState
from disagg.router.handles import WorkerHandle
from disagg.router.local_pause import PauseClock
from disagg.stats import Heartbeat, WorkerStats
from disagg.utils import end_loops

log = logging.getLogger(__name__)


class Action(enum.Enum):
    NONE = "none"
    SNAPSHOT = "snapshot"  # first sighting: pull its KV state into the index
    REJOIN = "rejoin"  # rewire peers, snapshot, then READY
    KILL = "kill"  # alive but useless: kill the process so it restarts


@dataclass
class HealthConfig:
    heartbeat_interval_s: float = 0.2
    heartbeat_timeout_s: float = 0.5
    liveness_timeout_s: float = 1.2  # no successful heartbeat for this long: out of routing
    restart_after_s: float = 6.0  # unresponsive (not dead) for this long: kill it so Ray restarts it
    stuck_step_s: float = 60.0  # one engine step running this long: stuck
    max_step_failures: int = 3  # consecutive failed engine steps: drain and restart
    # the supervisor's own tick coming this much later than heartbeat_interval_s: the router was paused, and so
    # much of the workers' silence is its own
    local_pause_s: float = 0.2
    # however paused the router was, a worker this long without an answer by the clock, over at least excuse_ticks
    # of the supervisor's ticks, is judged: a router starved for good (ticking, late) must still take a hung worker
    # out, while one long stall (no tick in it) stays excused
    max_excused_s: float = 30.0
    excuse_ticks: int = 3
    rejoin_timeout_s: float = 30.0
    snapshot_timeout_s: float = 10.0
    max_events: int = 1000  # bound of the health event log


@dataclass
class WorkerHealth:
    name: str
    role: Role
    state: WorkerState = WorkerState.READY
    since: float = 0.0
    reason: str = ""
    incarnation: str | None = None
    last_ok: float | None = None  # its last answer, moved later by the router's own pauses
    last_answer: float | None = None  # its last answer by the clock
    answered_at_tick: int = 0  # the supervisor's tick count at its last answer
    killed_incarnation: str | None = None
    restarts: int = 0
    heartbeat: Heartbeat | None = None

    @property
    def stats(self) -> WorkerStats | None:
        """The figures of its latest heartbeat (None before the first one, or before it measured any)."""
        return self.heartbeat.stats if self.heartbeat is not None else None


@dataclass
class HealthEvent:
    wall_time: float
    worker: str
    state: str
    reason: str
    incarnation: str | None


class HealthMonitor:
    def __init__(
        self,
        config: HealthConfig,
        roles: dict[str, Role],
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, WorkerState, WorkerState], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        now = clock()
        self.workers = {
            name: WorkerHealth(name, role, since=now, last_ok=now, last_answer=now) for name, role in roles.items()
        }
        self.events: deque[HealthEvent] = deque(maxlen=config.max_events)
        self._on_change = on_change
        # parked: alive but out of routing, whatever its state - asleep for the fleet (router/parking.py)
        self.parked: set[str] = set()
        c = config
        self.pause = PauseClock(c.heartbeat_interval_s, c.local_pause_s, c.liveness_timeout_s)  # ticked: Supervisor

    # ------------------------------------------------------------------ inputs
    def on_heartbeat(self, name: str, hb: Heartbeat, now: float | None = None) -> Action:
        now = self.clock() if now is None else now
        w = self.workers[name]
        w.heartbeat = hb
        if w.incarnation is None:  # first sighting (the router itself may have restarted)
            w.incarnation = hb.incarnation
            self._heard(w, now)
            return Action.SNAPSHOT
        if hb.incarnation != w.incarnation:
            w.incarnation = hb.incarnation
            self._heard(w, now)
            w.restarts += 1
            self._set(w, WorkerState.STARTING, "restarted", now)
            return Action.REJOIN
        if hb.incarnation == w.killed_incarnation:
            return Action.NONE  # answering on its way out; wait for the new incarnation
        self._heard(w, now)
        if not hb.healthy:
            why = hb.fault or f"the worker gave up after {hb.consecutive_step_failures} failed engine steps"
            return self._kill(w, why, now)
        if hb.consecutive_step_failures >= self.config.max_step_failures:
            return self._kill(w, f"{hb.consecutive_step_failures} engine steps failed in a row", now)
        if hb.has_work and hb.step_busy_s > self.config.stuck_step_s:
            return self._kill(w, f"engine step running for {hb.step_busy_s:.0f}s", now)
        if w.state is WorkerState.DEAD:  # it was only slow: its index entries were dropped, so rejoin
            self._set(w, WorkerState.STARTING, "answering again", now)
            return Action.REJOIN
        return Action.NONE

    def on_failure(self, name: str, error: DisaggError, now: float | None = None) -> Action:
        """A heartbeat failed: `WorkerLost` (the process is gone) or `DeadlineExceeded` (no answer)."""
        now = self.clock() if now is None else now
        w = self.workers[name]
        if isinstance(error, WorkerLost):
            if w.state is not WorkerState.DEAD:
                self._set(w, WorkerState.DEAD, f"process died: {error.message[:120]}", now)
            return Action.NONE  # Ray restarts it
        unanswered = now - (w.last_answer if w.last_answer is not None else now)
        starved = (
            unanswered >= self.config.max_excused_s
            and self.pause.ticks - w.answered_at_tick >= self.config.excuse_ticks
        )
        if self.pause.paused(now) and not starved:
            return Action.NONE  # the router was away: no answer is no evidence (the next tick excuses the pause)
        silent = unanswered if starved else now - (w.last_ok if w.last_ok is not None else now)
        if w.state is not WorkerState.DEAD and silent >= self.config.liveness_timeout_s:
            self._set(w, WorkerState.DEAD, f"no heartbeat for {silent:.1f}s", now)
        if silent >= self.config.restart_after_s and w.incarnation != w.killed_incarnation:
            w.killed_incarnation = w.incarnation
            self._log(w, f"unresponsive for {silent:.1f}s: killing it", now)
            return Action.KILL
        return Action.NONE

    def on_tick(self, now: float | None = None) -> float:
        """The supervisor's own tick, every heartbeat_interval_s; returns the local pause it excused (0: none).
        A pause moves every worker's last answer later by its length: the workers were not silent, the router was
        not listening."""
        now = self.clock() if now is None else now
        paused = self.pause.tick(now)
        if paused:
            for w in self.workers.values():
                if w.last_ok is not None:
                    w.last_ok = min(now, w.last_ok + paused)
        return paused

    def start_listening(self, now: float | None = None) -> None:
        """The supervisor (re)starts: no worker has been silent to it yet (a restart does not hold the time it was
        stopped against anyone)."""
        now = self.clock() if now is None else now
        for w in self.workers.values():
            self._heard(w, now)

    def _heard(self, w: WorkerHealth, now: float) -> None:
        """`w` answered (or is taken as having answered) at `now`: its silence starts again from here."""
        w.last_ok = w.last_answer = now
        w.answered_at_tick = self.pause.ticks

    def mark_ready(self, name: str, reason: str = "rejoined") -> None:
        w = self.workers[name]
        if w.state is not WorkerState.READY:
            self._set(w, WorkerState.READY, reason, self.clock())

    def condemn(self, name: str, reason: str) -> Action:
        """Out of routing and restarted: it answers, but wrongly (a canary). KILL, unless it is already out."""
        w = self.workers[name]
        if w.state is WorkerState.DEAD or w.incarnation == w.killed_incarnation:
            return Action.NONE
        return self._kill(w, reason, self.clock())

    def take_out(self, name: str, reason: str) -> None:
        """Out of routing now, before its next heartbeat (a request just met its impossible output, and its retry
        must not land there again); that heartbeat then decides: unhealthy -> killed, healthy -> it rejoins."""
        w = self.workers[name]
        if w.state in (WorkerState.READY, WorkerState.DRAINED):
            self._set(w, WorkerState.DEAD, reason, self.clock())

    def drain(self, name: str, reason: str) -> bool:
        """No new requests for a READY worker (its streams finish); False if it was not READY."""
        return self._move(name, WorkerState.READY, WorkerState.DRAINED, reason)

    def undrain(self, name: str, reason: str) -> bool:
        return self._move(name, WorkerState.DRAINED, WorkerState.READY, reason)

    def _move(self, name: str, src: WorkerState, dst: WorkerState, reason: str) -> bool:
        w = self.workers[name]
        if w.state is not src:
            return False
        self._set(w, dst, reason, self.clock())
        return True

    def _kill(self, w: WorkerHealth, reason: str, now: float) -> Action:
        w.killed_incarnation = w.incarnation
        self._set(w, WorkerState.DEAD, reason, now)
        return Action.KILL

    def _set(self, w: WorkerHealth, state: WorkerState, reason: str, now: float) -> None:
        old = w.state
        w.state, w.since, w.reason = state, now, reason
        self._log(w, reason, now)
        if old is not state and self._on_change is not None:
            self._on_change(w.name, old, state)

    def _log(self, w: WorkerHealth, reason: str, now: float) -> None:
        self.events.append(HealthEvent(time.time(), w.name, w.state.value, reason, w.incarnation))
        log.warning("worker %s: %s (%s)", w.name, w.state.value, reason)

    # ------------------------------------------------------------------ queries
    def routable(self, name: str) -> bool:
        return self.workers[name].state is WorkerState.READY and name not in self.parked

    def watched(self, name: str) -> bool:
        """Canaries and outlier checks look at it: READY or DRAINED, not parked (asleep, it answers nothing)."""
        return self.workers[name].state in (WorkerState.READY, WorkerState.DRAINED) and name not in self.parked

    def is_dead(self, name: str) -> bool:
        """Out of routing: requests streaming from it migrate."""
        return self.workers[name].state is WorkerState.DEAD

    def role_of(self, name: str) -> Role:
        return self.workers[name].role

    def live_counts(self) -> dict[str, int]:
        counts = {role.value: 0 for role in Role}
        for name, w in self.workers.items():
            if self.routable(name):
                counts[w.role.value] += 1
        return counts

    def any_decoder_ready(self) -> bool:
        return any(self.routable(name) and w.role.decodes for name, w in self.workers.items())

    def recent_events(self, n: int = 100) -> list[dict]:
        return [e.__dict__ for e in list(self.events)[-n:]]


class Supervisor:
    """Runs the monitor: one probe loop per worker; rewires and snapshots rejoining workers; kills useless ones."""

    def __init__(
        self,
        monitor: HealthMonitor,
        handles: Mapping[str, WorkerHandle],
        apply_snapshot: Callable[[KVEventBatch], object],
        needs_snapshot: Callable[[str], bool],
        on_heartbeat: Callable[[str, Heartbeat], None] | None = None,
    ) -> None:
        self.monitor = monitor
        self.config = monitor.config
        self.handles = handles
        self._apply_snapshot = apply_snapshot
        self._needs_snapshot = needs_snapshot
        self._on_heartbeat = on_heartbeat
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._busy: set[str] = set()  # workers with a rejoin or snapshot in flight
        self.failures = 0  # unexpected errors inside the loops (bounded: each is logged once per kind)

    def start(self) -> None:
        self._stopping = False
        self.monitor.start_listening()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._probe_loop(name)) for name in self.handles]
        self._tasks.append(loop.create_task(self._tick_loop()))

    async def stop(self) -> None:
        self._stopping = True  # the flag, not only the cancellation, ends the loops (utils.end_loops says why)
        await end_loops(self._tasks)
        self._tasks = []
        self.monitor.pause.stop()

    async def _probe_loop(self, name: str) -> None:
        while not self._stopping:
            try:
                await self.probe(name)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop liveness checking of this worker
                self.failures += 1
                log.exception("health probe of %s failed unexpectedly", name)
            await asyncio.sleep(self.config.heartbeat_interval_s)

    async def _tick_loop(self) -> None:
        while not self._stopping:
            self.monitor.on_tick()
            await asyncio.sleep(self.config.heartbeat_interval_s)

    async def probe(self, name: str) -> Action:
        handle = self.handles[name]
        try:
            hb = await handle.heartbeat(self.config.heartbeat_timeout_s)
        except (WorkerLost, DeadlineExceeded) as exc:
            action = self.monitor.on_failure(name, exc)
        else:
            action = self.monitor.on_heartbeat(name, hb)
            if self._on_heartbeat is not None:
                self._on_heartbeat(name, hb)
            if action is Action.NONE and self._needs_snapshot(name) and name not in self._busy:
                action = Action.SNAPSHOT
        await self._act(name, action)
        return action

    async def enforce(self, name: str, action: Action) -> None:
        """Carry out an action the monitor decided outside a probe (router/watch.py condemning a worker)."""
        await self._act(name, action)

    async def _act(self, name: str, action: Action) -> None:
        if action is Action.KILL:
            try:
                await self.handles[name].kill()
            except DisaggError as exc:
                log.warning("killing %s: %s", name, exc)
        elif action in (Action.REJOIN, Action.SNAPSHOT) and name not in self._busy:
            self._busy.add(name)
            coro = self._rejoin(name) if action is Action.REJOIN else self._snapshot(name)
            asyncio.get_running_loop().create_task(self._guard(name, coro))

    async def _guard(self, name: str, coro) -> None:
        try:
            await asyncio.wait_for(coro, self.config.rejoin_timeout_s)
        except (DisaggError, asyncio.TimeoutError) as exc:
            log.warning("rejoin/snapshot of %s failed: %s (retried on its next heartbeat)", name, exc)
        finally:
            self._busy.discard(name)

    async def _rejoin(self, name: str) -> None:
        await self.rewire()
        await self._snapshot(name)
        self.monitor.mark_ready(name)

    async def _snapshot(self, name: str) -> None:
        batch = await self.handles[name].kv_snapshot(self.config.snapshot_timeout_s)
        self._apply_snapshot(batch)

    async def rewire(self) -> None:
        """Give every reachable worker the NIXL layouts of every reachable worker (a restarted one has a new
        agent; peers drop the old one)."""
        timeout = self.config.snapshot_timeout_s
        names = [n for n, w in self.monitor.workers.items() if w.state is not WorkerState.DEAD]
        results = await asyncio.gather(*(self.handles[n].layout(timeout) for n in names), return_exceptions=True)
        layouts = [r for r in results if isinstance(r, bytes)]
        reachable = [n for n, r in zip(names, results) if isinstance(r, bytes)]
        acks = await asyncio.gather(
            *(self.handles[n].set_peers(layouts, timeout) for n in reachable), return_exceptions=True
        )
        for r in acks:
            if isinstance(r, BaseException) and not isinstance(r, DisaggError):
                raise r
