"""Moving a worker between prefill, decode and both at runtime, without a restart.

Lifecycle of one change (`RoleChanger.change`), a small state machine per worker:

    ROUTING   the router's routing sets follow at once: the worker gets no new work of a role it leaves, and new
              work of the role it takes (its engine can do both kinds at any time, so taking work early is safe)
    DRAINING  work of the old role already on it finishes where it is: streams it decodes run to their end, prompts
              queued on it for remote prefill reach their first token (the router's exact accounting says when);
              blocks it leased to readers stay leased until read, whatever its role - nothing is lost or leaked
    ANNOUNCED the worker is told its new role (heartbeats and spans carry it); a worker that restarts later comes
              back with its start-up role and is told again on its first heartbeat
    DONE / TIMED_OUT   drained within `drain_timeout_s` or not (not: the old work still finishes on the worker;
              only the announcement came first)

Pure asyncio; no Ray.  The changer is given what it uses - the health monitor (roles, liveness), the workers'
loads (the drain check), their handles (the announcement), the counters, and `route_as` (RouterCore's routing
sets) - never the core itself.  The planner (disagg/planner/) decides which changes to make, through its port
(router/planner_port.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from disagg.errors import DisaggError, InvalidRequest
from disagg.protocol import Role
from disagg.router.handles import WorkerHandle
from disagg.router.health import HealthMonitor
from disagg.router.policy import WorkerLoad
from disagg.stats import RouterCounters

log = logging.getLogger(__name__)


class ChangeState(str, enum.Enum):
    ROUTING = "routing"
    DRAINING = "draining"
    ANNOUNCED = "announced"
    DONE = "done"
    TIMED_OUT = "timed_out"


@dataclass
class RoleChangeConfig:
    drain_timeout_s: float = 120.0  # old-role work not finished by then keeps running; the role is announced
    drain_poll_s: float = 0.05
    announce_timeout_s: float = 5.0
    max_records: int = 256  # recent changes kept for /health and tests
    # router replicas (cluster/replicas.py): the role a worker reports is the truth - another replica may have
    # changed it - so the router adopts it instead of telling the worker its own view again
    follow_workers: bool = False


@dataclass
class RoleChange:
    worker: str
    old: Role
    new: Role
    reason: str
    started: float = field(default_factory=time.monotonic)
    state: ChangeState = ChangeState.ROUTING
    finished: float | None = None
    announced: bool = False
    detail: str = ""  # the planner's signals when it decided (empty for a manual change)
    at: float = field(default_factory=time.time)  # wall clock, to line changes up with a run's records

    def as_dict(self) -> dict:
        return {
            "worker": self.worker,
            "from": self.old.value,
            "to": self.new.value,
            "reason": self.reason,
            "state": self.state.value,
            "seconds": (self.finished or time.monotonic()) - self.started,
            "announced": self.announced,
            "detail": self.detail,
            "at": self.at,
        }


def drained(load: WorkerLoad, old: Role, new: Role) -> bool:
    """Whether work of the roles a worker leaves has finished, by the router's exact accounting (its `load`)."""
    if old.decodes and not new.decodes and load.active_requests:
        return False
    # a prefill-only worker's queue holds only remote prefills; a decoding one's also its own prompts
    return not (old is Role.PREFILL and new is not Role.PREFILL and load.queued_prefill_tokens)


class RoleChanger:
    def __init__(
        self,
        health: HealthMonitor,
        loads: Mapping[str, WorkerLoad],
        handles: Mapping[str, WorkerHandle | None],
        counters: RouterCounters,
        route_as: Callable[[str, Role], None],
        config: RoleChangeConfig | None = None,
    ) -> None:
        """`route_as(name, role)`: the router routes `name` as `role` from now on (RouterCore.set_routing_role)."""
        self.health, self.loads, self.handles, self.counters = health, loads, handles, counters
        self.route_as = route_as
        self.config = config or RoleChangeConfig()
        self.records: deque[RoleChange] = deque(maxlen=self.config.max_records)
        self.in_flight: dict[str, RoleChange] = {}

    def validate(self, name: str, new: Role) -> Role:
        """The worker's current role; InvalidRequest if the change is not allowed now."""
        worker = self.health.workers.get(name)
        if worker is None:
            raise InvalidRequest(f"no worker named {name!r}", param="worker")
        if name in self.in_flight:
            raise InvalidRequest(f"{name} is already changing role", param="worker")
        if worker.role is new:
            raise InvalidRequest(f"{name} already has role {new.value}", param="role")
        if name in self.health.parked:  # asleep for another model's worker (router/parking.py)
            raise InvalidRequest(f"{name} is parked; it changes role once woken", param="worker")
        parked = self.health.parked
        others = [w for n, w in self.health.workers.items() if n != name and n not in parked and w.role.decodes]
        if not new.decodes and not others:
            raise InvalidRequest("the last decode-capable worker cannot stop decoding", param="role")
        return worker.role

    async def change(self, name: str, new: Role, reason: str = "manual", detail: str = "") -> RoleChange:
        old = self.validate(name, new)
        record = RoleChange(name, old, new, reason, detail=detail)
        self.in_flight[name] = record
        self.records.append(record)
        try:
            self.route_as(name, new)
            record.state = ChangeState.DRAINING
            deadline = time.monotonic() + self.config.drain_timeout_s
            while not drained(self.loads[name], old, new) and time.monotonic() < deadline:
                await asyncio.sleep(self.config.drain_poll_s)
            timed_out = not drained(self.loads[name], old, new)
            record.announced = await self.announce(name, new)
            record.state = ChangeState.TIMED_OUT if timed_out else ChangeState.DONE
        finally:
            record.finished = time.monotonic()
            self.in_flight.pop(name, None)
        log.info(
            "role change %s: %s -> %s (%s) %s in %.2fs",
            name,
            old.value,
            new.value,
            reason,
            record.state.value,
            record.finished - record.started,
        )
        self.counters.role_changed(old, new)
        return record

    async def announce(self, name: str, role: Role) -> bool:
        handle = self.handles.get(name)
        if handle is None:  # a routing-only core (the simulator): nothing to tell
            return True
        try:
            await handle.set_role(role, self.config.announce_timeout_s)
            return True
        except DisaggError as exc:  # it will be told again on its next heartbeat
            log.warning("could not announce role %s to %s: %s", role.value, name, exc)
            return False

    def reconcile(self, name: str, reported: Role) -> None:
        """A heartbeat reported `reported`: if that is not the role the router assigned (a worker that restarted
        after a change), tell it again in the background - or, following the workers, route it as it reports."""
        assigned = self.health.role_of(name)
        if reported is assigned or name in self.in_flight:
            return
        if self.config.follow_workers:
            log.info("%s reports role %s (was %s here): routing it so", name, reported.value, assigned.value)
            self.route_as(name, reported)
            return
        loop = asyncio.get_running_loop()
        loop.create_task(self.announce(name, assigned))
