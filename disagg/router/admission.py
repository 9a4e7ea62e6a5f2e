"""Admission control: the router-side queue.  Requests wait here - not in unbounded worker queues - until a worker
has capacity, in strict priority bands with token-weighted fair sharing between tenants inside a band; the queue
is bounded, and a request that cannot start in time is refused with 429 quickly instead of timing out.

Priority polarity: `priority` is an integer, HIGHER = MORE IMPORTANT (default 0; the API accepts -100..100).
Bands are strict: a queued request of a higher band is always dispatched before any of a lower band, and when
the queue is full, the newest request of the lowest band below the newcomer's is shed to make room.

Fairness inside a band (virtual token counters, after Sheng et al., OSDI'24 "VTC"): each tenant's counter grows
by the tokens it is served - its prompt's tokens when a request is dispatched, one per generated token -
divided by its weight.  The next request taken from a band is the oldest one of the tenant with the smallest
counter; a tenant that comes back after idling starts from the smallest counter among the band's active tenants,
so idle time does not bank credit.  A tenant sending 10x the tokens of another therefore gets its weight's share
of the service, not 10x.

Deadlines: a request must *start* within its deadline (server default, overridable per request).  On arrival
the queue estimates the wait from the tokens queued ahead of it (same or higher band) and the measured dispatch
rate; if the estimate is past `admit_within` (80%) of the deadline the request is refused at once (429 with a
Retry-After from the same estimate).  A request still queued at its deadline is refused then.

Pure logic (clock injected, no asyncio): the router core wraps it (router.py) and decides capacity.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from disagg.errors import Overloaded, Rejection


@dataclass
class AdmissionConfig:
    max_queued_requests: int = field(
        default=1024, metadata={"flag": "--queue-max-requests", "help": "admission queue bound (429 beyond)"}
    )
    max_queued_tokens: int = 2_000_000  # prompt tokens waiting in the queue
    default_deadline_s: float = field(  # a request that cannot start within this is refused (429)
        default=60.0,
        metadata={
            "flag": "--queue-deadline-s",
            "help": "a request that cannot start within this gets 429 (per request: body field deadline_s)",
        },
    )
    max_deadline_s: float = 600.0
    tenant_weights: dict[str, float] = field(default_factory=dict)  # unknown tenants weigh 1
    max_tenants: int = 10_000  # counters of idle tenants beyond this are forgotten (least recently served)
    rate_window_s: float = 10.0  # the dispatch rate behind wait estimates is measured over this window
    min_rate_samples: int = 5  # no early refusal before this many dispatches were measured
    min_retry_after_s: float = 1.0
    # refuse on arrival when the estimated wait passes this fraction of the request's deadline: the estimate
    # errs both ways under bursty dispatch, and a request refused at its deadline has waited for nothing (its 429
    # comes late); the rest of the deadline absorbs the error
    admit_within: float = 0.8

    def weight(self, tenant: str) -> float:
        return max(1e-6, self.tenant_weights.get(tenant, 1.0))


class EntryState(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class Entry:
    request_id: str
    tenant: str
    priority: int
    tokens: int  # prompt tokens (what the request asks of the prefill side)
    arrived: float
    deadline: float
    state: EntryState = EntryState.QUEUED
    rejection: Overloaded | None = None
    waiter: asyncio.Future[None] | None = None  # set by the async wrapper (a future resolved on dispatch or rejection)
    order: int = 0
    worker: str | None = None  # routed on arrival (rescore off): dispatched only when this worker has room
    head_start_s: float = 0.0  # counts as having arrived this much earlier, in its tenant's own queue only

    @property
    def ranked_arrival(self) -> float:
        return self.arrived - self.head_start_s


class AdmissionQueue:
    def __init__(self, config: AdmissionConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or AdmissionConfig()
        self.clock = clock
        self._bands: dict[int, dict[str, deque[Entry]]] = {}  # priority -> tenant -> FIFO
        self._counters: OrderedDict[str, float] = OrderedDict()  # tenant -> virtual tokens served / weight
        self._dispatches: deque[tuple[float, int]] = deque()  # (time, tokens) within the rate window
        self._order = itertools.count()
        self.num_queued = 0
        self.queued_tokens = 0
        self.rejected: dict[Rejection, int] = dict.fromkeys(Rejection, 0)
        self.served_tokens: dict[str, float] = {}

    # ------------------------------------------------------------------ arrivals
    def submit(self, entry: Entry) -> list[Entry]:
        """Queue `entry`; returns entries shed to make room (already marked rejected).  Raises Overloaded when the
        entry itself is refused (queue full with nothing lower to shed, or its estimated wait is past its
        deadline)."""
        cfg = self.config
        wait = self.estimated_wait(entry.priority, entry.tokens, entry.tenant)
        if wait is not None and wait > (entry.deadline - entry.arrived) * cfg.admit_within:
            raise self._refuse(
                entry,
                Rejection.DEADLINE,
                wait,
                f"the queue ahead would take ~{wait:.1f}s, past this request's deadline",
            )
        victims: list[Entry] = []
        n, tokens = self.num_queued + 1, self.queued_tokens + entry.tokens
        candidates = self._shed_order(below=entry.priority)
        while n > cfg.max_queued_requests or tokens > cfg.max_queued_tokens:
            victim = next(candidates, None)
            if victim is None:  # even shedding every lower band would not make room
                raise self._refuse(entry, Rejection.QUEUE_FULL, wait, "the request queue is full")
            victims.append(victim)
            n, tokens = n - 1, tokens - victim.tokens
        for victim in victims:
            self._remove(victim)
            victim.rejection = self._refuse(
                victim, Rejection.SHED, wait, "shed from the queue for higher-priority requests"
            )
            victim.state = EntryState.REJECTED
        entry.order = next(self._order)
        band = self._bands.setdefault(entry.priority, {})
        if entry.tenant not in band or not band[entry.tenant]:
            self._activate(entry.tenant, band)
        queue = band.setdefault(entry.tenant, deque())
        # behind every entry that ranks earlier (FIFO without head starts); a head start never jumps another
        # tenant's fair share nor a higher band, only the tenant's own later arrivals (Dynamo's latency_sensitivity)
        at = len(queue)
        while at > 0 and queue[at - 1].ranked_arrival > entry.ranked_arrival:
            at -= 1
        queue.insert(at, entry)
        self.num_queued += 1
        self.queued_tokens += entry.tokens
        return victims

    def _activate(self, tenant: str, band: dict[str, deque[Entry]]) -> None:
        """A tenant with nothing queued in this band starts from the smallest active counter (no banked credit)."""
        active = [self._counters.get(t, 0.0) for t, q in band.items() if q and t != tenant]
        floor = min(active) if active else None
        current = self._counters.get(tenant, 0.0)
        if floor is not None and current < floor:
            current = floor
        self._counters[tenant] = current
        self._counters.move_to_end(tenant)
        while len(self._counters) > self.config.max_tenants:
            oldest = next(iter(self._counters))
            if any(oldest in b and b[oldest] for b in self._bands.values()):
                self._counters.move_to_end(oldest)
                break
            del self._counters[oldest]

    def _shed_order(self, below: int):
        """Queued entries of bands below `below`: lowest band first, newest first within a band."""
        for priority in sorted(p for p in self._bands if p < below):
            yield from sorted((e for q in self._bands[priority].values() for e in q), key=lambda e: -e.order)

    def _refuse(self, entry: Entry, reason: Rejection, wait: float | None, message: str) -> Overloaded:
        self.rejected[reason] += 1
        retry = max(self.config.min_retry_after_s, wait if wait is not None else self.config.min_retry_after_s)
        return Overloaded(message, retry_after_s=retry, code=reason.value)

    # ------------------------------------------------------------------ leaving the queue
    def cancel(self, entry: Entry) -> bool:
        """The client went away while queued: the entry leaves at once."""
        if entry.state is not EntryState.QUEUED:
            return False
        self._remove(entry)
        entry.state = EntryState.CANCELLED
        return True

    def expire(self, now: float | None = None) -> list[Entry]:
        """Refuse queued entries whose deadline passed."""
        now = self.clock() if now is None else now
        out = [e for band in self._bands.values() for q in band.values() for e in q if e.deadline <= now]
        for entry in out:  # removing empties the queue dicts: collect first
            self._remove(entry)
            wait = self.estimated_wait(entry.priority, 0, entry.tenant)
            entry.rejection = self._refuse(entry, Rejection.EXPIRED, wait, "could not start before its deadline")
            entry.state = EntryState.REJECTED
        return out

    def close(self) -> list[Entry]:
        """Refuse every queued entry: the queue is stopping, and nothing would dispatch them any more."""
        out = [e for band in self._bands.values() for q in band.values() for e in q]
        for entry in out:
            self._remove(entry)
            entry.rejection = self._refuse(entry, Rejection.CLOSED, None, "its queue stopped (shutdown or unload)")
            entry.state = EntryState.REJECTED
        return out

    def pop_next(self, can_dispatch: Callable[[Entry], bool]) -> Entry | None:
        """The next entry to dispatch (highest band, fairest tenant) if `can_dispatch` says a worker can take it;
        None if the queue is empty or that entry must wait for capacity (strict: nothing overtakes it)."""
        for priority in sorted((p for p, band in self._bands.items() if any(band.values())), reverse=True):
            band = self._bands[priority]
            # smallest counter first; on a tie (a tenant lifted to the band's level when it came back) the one
            # with less queued goes first, then the one whose next request was queued first
            tenant = min(
                (t for t, q in band.items() if q),
                key=lambda t: (self._counters.get(t, 0.0), len(band[t]), band[t][0].order),
            )
            entry = band[tenant][0]
            if not can_dispatch(entry):
                return None
            self._remove(entry)
            entry.state = EntryState.DISPATCHED
            self.charge(entry.tenant, entry.tokens)
            now = self.clock()
            self._dispatches.append((now, entry.tokens))
            while self._dispatches[0][0] < now - self.config.rate_window_s:  # bounded by the window
                self._dispatches.popleft()
            return entry
        return None

    def _remove(self, entry: Entry) -> None:
        queue = self._bands[entry.priority][entry.tenant]
        queue.remove(entry)
        if not queue:
            del self._bands[entry.priority][entry.tenant]
            if not self._bands[entry.priority]:
                del self._bands[entry.priority]
        self.num_queued -= 1
        self.queued_tokens -= entry.tokens

    # ------------------------------------------------------------------ accounting
    def charge(self, tenant: str, tokens: float) -> None:
        """`tokens` more served to `tenant` (prompt at dispatch, each generated token later)."""
        self._counters[tenant] = self._counters.get(tenant, 0.0) + tokens / self.config.weight(tenant)
        self.served_tokens[tenant] = self.served_tokens.get(tenant, 0.0) + tokens
        if len(self.served_tokens) > self.config.max_tenants:
            self.served_tokens.pop(next(iter(self.served_tokens)))

    def dispatch_rate(self) -> float | None:
        """Prompt tokens dispatched per second over the recent window (None until measured)."""
        now = self.clock()
        window = self.config.rate_window_s
        while self._dispatches and self._dispatches[0][0] < now - window:
            self._dispatches.popleft()
        if len(self._dispatches) < self.config.min_rate_samples:
            return None
        span = max(now - self._dispatches[0][0], 1.0)
        return sum(t for _, t in self._dispatches) / span

    def tokens_ahead(self, priority: int, tokens: int, tenant: str | None = None) -> float:
        """Prompt tokens that would be dispatched before a new request of `tenant` in this band: everything in
        higher bands, the tenant's own queue, and of every other tenant in the band what fair sharing serves it
        first - what it is behind by, plus its weighted share of the tokens the newcomer's tenant has queued."""
        ahead = float(
            sum(e.tokens for p, band in self._bands.items() if p > priority for q in band.values() for e in q)
        )
        band = self._bands.get(priority, {})
        if tenant is None:
            return ahead + sum(e.tokens for q in band.values() for e in q)
        own = sum(e.tokens for e in band.get(tenant, ()))
        active = [self._counters.get(t, 0.0) for t, q in band.items() if q and t != tenant]
        mine = max(self._counters.get(tenant, 0.0), min(active)) if active else self._counters.get(tenant, 0.0)
        w_mine = self.config.weight(tenant)
        for other, queue in band.items():
            if other == tenant or not queue:
                continue
            w = self.config.weight(other)
            owed = max(0.0, mine - self._counters.get(other, 0.0)) * w + (own + tokens) * w / w_mine
            ahead += min(sum(e.tokens for e in queue), owed)
        return ahead + own

    def estimated_wait(self, priority: int, tokens: int, tenant: str | None = None) -> float | None:
        """Seconds until a new request would start, from the tokens ahead of it (`tokens_ahead`) and the measured
        dispatch rate; None when nothing is ahead or no rate is known yet."""
        ahead = self.tokens_ahead(priority, tokens, tenant)
        if ahead == 0:
            return None
        rate = self.dispatch_rate()
        if rate is None or rate <= 0:
            return None
        return ahead / rate

    # ------------------------------------------------------------------ introspection
    def depth(self) -> dict[tuple[int, str], int]:
        return {(p, t): len(q) for p, band in self._bands.items() for t, q in band.items() if q}

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def __len__(self) -> int:
        return self.num_queued


def jain_index(values: list[float]) -> float:
    """Jain's fairness index of per-tenant shares (1 = perfectly fair)."""
    if not values or not any(values):
        return math.nan
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


@dataclass
class CapacityConfig:
    """When a worker counts as saturated (judged from the router's own exact accounting, no polling)."""

    max_prefill_queue_tokens: int = field(  # prompt tokens dispatched to a worker and not yet past their first token
        default=4096, metadata={"help": "admission: prompt tokens queued on a worker before it counts as saturated"}
    )
    max_kv_fraction: float = 0.9  # of the worker's KV blocks (from its heartbeats) held by in-flight requests
    max_running: int = field(default=64, metadata={"help": "admission: in-flight requests per worker"})
    priority_headroom: float = 0.25  # priority > 0 may fill workers this much beyond the limits (whole slots)


class AdmissionControl:
    """The queue on an event loop: `admit` waits until the request is dispatched (or raises Overloaded); a pump
    dispatches queue heads whenever capacity may have freed, and a timer refuses requests past their deadline."""

    def __init__(
        self,
        queue: AdmissionQueue,
        can_dispatch: Callable[[Entry], bool],
        on_wait: Callable[[float], None] | None = None,
        tick_s: float = 0.05,
    ) -> None:
        self.queue = queue
        self._can_dispatch = can_dispatch
        self._on_wait = on_wait  # observes each dispatched request's queueing time
        self.tick_s = tick_s
        self._timer: asyncio.Task[None] | None = None

    async def admit(self, entry: Entry) -> None:
        for victim in self.queue.submit(entry):  # raises Overloaded if the entry itself is refused
            self._resolve(victim)
        entry.waiter = asyncio.get_running_loop().create_future()
        self.pump()
        try:
            await entry.waiter
        except asyncio.CancelledError:  # the client went away while queued: leave at once
            self.queue.cancel(entry)
            raise

    def pump(self) -> None:
        """Dispatch queue heads while workers have room."""
        while (entry := self.queue.pop_next(self._can_dispatch)) is not None:
            if self._on_wait is not None:
                self._on_wait(self.queue.clock() - entry.arrived)
            self._resolve(entry)

    def _resolve(self, entry: Entry) -> None:
        waiter = entry.waiter
        if waiter is None or waiter.done():
            return
        if entry.state is EntryState.DISPATCHED:
            waiter.set_result(None)
        elif entry.rejection is not None:
            waiter.set_exception(entry.rejection)

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        for entry in self.queue.close():  # no timer and no pump from here on: a waiter left queued would hang
            self._resolve(entry)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            for entry in self.queue.expire():
                self._resolve(entry)
            self.pump()  # progress (first tokens) frees prefill capacity without an end() to trigger a pump
