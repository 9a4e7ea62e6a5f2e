"""Parking a worker: out of routing and asleep, so that another model's worker can be awake in its place (the fleet
planner: planner/fleet.py), and waking it back into routing.  One model's workers, in its routing core.

Lifecycle of a park (`Parking.park`), as a role change's (router/roles.py):

    ROUTING   the worker leaves routing at once (HealthMonitor.parked): no new requests, no canaries
    DRAINING  its requests finish where they are (streams to their end, remote prefills to their first token: the
              router's exact accounting says when), up to the timeout; not drained by then: back into routing, and
              the park fails (Conflict) - nothing is cut short
    SLEEPING  it forgets its prefix cache (a CLEARED event: the index drops its device blocks) and gives its KV
              pages back (engine/sleep.py); a reader's lease not yet released is waited for, up to the timeout
    PARKED    asleep, out of routing, still supervised (heartbeats; a restart is seen as for any worker)

`wake` wakes it, then puts it back into routing.  Heartbeats say whether a worker is asleep, and `reconcile` makes
parking agree: the first one this core sees is the truth (a restarted router takes the workers' word for what the
fleet did before it, in whatever order they report; if the whole model turns out asleep, the workers it was started
with awake wake); later, a parked worker that reports itself awake was restarted, and sleeps again, and an asleep
one that is not parked (a sleep whose answer was lost, a report older than a wake) is woken.  A paused core (its
whole model sleeps: http/admin_sleep.py) reconciles nothing: its workers are asleep on purpose.

Pure asyncio; no Ray.  Given what it uses: the health monitor, the workers' loads and handles, and the role
changes in flight (a worker changing role is not parked).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from disagg.errors import Conflict, DisaggError, InvalidRequest
from disagg.planner.fleet import FleetWorker, ModelSignal
from disagg.protocol import SleepReport
from disagg.router.handles import WorkerHandle
from disagg.router.health import HealthMonitor
from disagg.router.policy import WorkerLoad

log = logging.getLogger(__name__)


@dataclass
class ParkingConfig:
    poll_s: float = 0.05  # how often a drain (and a sleep refused for a lease) is checked again
    call_timeout_s: float = 30.0  # one sleep or wake call to the worker


class Parking:
    def __init__(
        self,
        health: HealthMonitor,
        loads: Mapping[str, WorkerLoad],
        handles: Mapping[str, WorkerHandle | None],
        changing_role: Callable[[str], bool],
        config: ParkingConfig | None = None,
    ) -> None:
        self.health, self.loads, self.handles = health, loads, handles
        self.changing_role = changing_role
        self.config = config or ParkingConfig()
        self.in_flight: set[str] = set()  # parks and wakes under way
        self.paused = False  # the whole model sleeps (RouterCore.pause): nothing to reconcile
        self._tasks: set[asyncio.Task] = set()  # background re-sleeps and adoption wakes
        self.seen: set[str] = set()  # workers whose heartbeat this core has reconciled (the first is the truth)
        self.standby_names: set[str] = set()  # started asleep (the deployment's standby)

    def standby(self, names: list[str]) -> None:
        """Workers started asleep (a deployment's standby): parked from the start, never routed to."""
        self.standby_names.update(n for n in names if n in self.health.workers)
        self.health.parked.update(self.standby_names)

    def signal(
        self, model: str, queued: int, max_running: int, expected: float | None, *, serving: bool
    ) -> ModelSignal:
        """The model's workers and demand as the fleet planner reads them (`queued`: its admission queue;
        `expected`: the requests it would hold at the rate it is sent now)."""
        workers = [
            FleetWorker(
                name,
                w.role,
                self.loads[name].active_requests,
                parked=name in self.health.parked,
                routable=self.health.routable(name),
                changing=self.changing(name),
            )
            for name, w in self.health.workers.items()
        ]
        return ModelSignal(model, workers, queued, max_running, serving=serving, expected=expected)

    def changing(self, name: str) -> bool:
        return name in self.in_flight or self.changing_role(name)

    def _awake_decoders(self, besides: str) -> int:
        return sum(
            1 for n, w in self.health.workers.items() if n != besides and self.health.routable(n) and w.role.decodes
        )

    async def park(self, name: str, timeout_s: float) -> SleepReport | None:
        """Drain `name`, then put it to sleep, out of routing; its SleepReport (None: a routing-only core)."""
        self.leave(name)
        return await self.settle(name, timeout_s)

    def leave(self, name: str) -> None:
        """A park's first step: `name` takes no new request from now on (Conflict if it may not be parked)."""
        if name not in self.health.workers:
            raise InvalidRequest(f"no worker named {name!r}", param="worker")
        if name in self.health.parked or self.changing(name):
            raise Conflict(f"{name} is parked already, or changing")
        if self.health.role_of(name).decodes and not self._awake_decoders(besides=name):
            raise Conflict(f"{name} is its model's last awake decoder")
        self.in_flight.add(name)
        self.health.parked.add(name)

    async def settle(self, name: str, timeout_s: float) -> SleepReport | None:
        """The rest of a park that `leave` began: the drain, then the sleep; a failure routes it again."""
        deadline = time.monotonic() + timeout_s
        try:
            load = self.loads[name]
            while (load.active_requests or load.queued_prefill_tokens) and time.monotonic() < deadline:
                await asyncio.sleep(self.config.poll_s)
            if load.active_requests or load.queued_prefill_tokens:
                raise Conflict(f"{name}: its requests were still running after {timeout_s:.0f}s; not parked")
            handle = self.handles.get(name)
            report = None if handle is None else await self._retrying(handle.sleep, deadline)
        except BaseException:
            self.health.parked.discard(name)  # serving again, as it was
            raise
        finally:
            self.in_flight.discard(name)
        log.info("parked %s", name)
        return report

    async def wake(self, name: str) -> SleepReport | None:
        """Wake a parked worker and put it back into routing."""
        if name not in self.health.parked or name in self.in_flight:
            raise Conflict(f"{name} is not a parked worker")
        self.in_flight.add(name)
        try:
            return await self._wake(name)
        finally:
            self.in_flight.discard(name)

    async def _wake(self, name: str) -> SleepReport | None:
        handle = self.handles.get(name)
        report = None if handle is None else await handle.wake(self.config.call_timeout_s)
        self.health.parked.discard(name)
        log.info("woke %s", name)
        return report

    async def _retrying(self, call: Callable[[float], Awaitable[SleepReport]], deadline: float) -> SleepReport:
        """`call` until it is not refused with Conflict (a reader's lease not yet released), up to `deadline`."""
        while True:
            try:
                return await call(self.config.call_timeout_s)
            except Conflict:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(self.config.poll_s)

    def reconcile(self, name: str, asleep: bool) -> None:
        """A heartbeat said whether `name` is asleep: make that agree with parking (see the module docstring)."""
        first = name not in self.seen
        self.seen.add(name)
        if self.paused or self.changing(name) or self.handles.get(name) is None:
            return
        parked = name in self.health.parked
        if first:  # the truth, whatever this core assumed at its start (a restarted router takes what was done)
            (self.health.parked.add if asleep else self.health.parked.discard)(name)
            self._serve_again()
        elif parked and not asleep:  # restarted while parked: it came back awake
            self._background(name, self._sleep_again(name))
        elif asleep and not parked:  # a sleep whose answer was lost, or a report older than a wake: it serves
            self._background(name, self._wake(name))

    def _serve_again(self) -> None:
        """Once every worker has reported: if none decodes awake (the whole model slept before this router
        started), the workers it was started with awake wake; its standby stay parked."""
        if len(self.seen) < len(self.health.workers) or self._awake_decoders(besides=""):
            return
        for n in list(self.health.parked):
            if n not in self.standby_names and not self.changing(n):
                self._background(n, self._wake(n))

    async def stop(self) -> None:
        """Cancel the background sleeps and wakes (the core stops)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _sleep_again(self, name: str) -> None:
        handle = self.handles[name]
        if handle is not None:
            await self._retrying(handle.sleep, time.monotonic() + self.config.call_timeout_s)

    def _background(self, name: str, work: Awaitable[object]) -> None:
        async def run() -> None:
            self.in_flight.add(name)
            try:
                await work
            except DisaggError as exc:  # its next heartbeat tries again
                log.warning("parking %s: %s", name, exc)
            finally:
                self.in_flight.discard(name)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
