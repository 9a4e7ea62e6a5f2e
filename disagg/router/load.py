"""The router's exact accounting of in-flight work per worker, and the saturation check admission builds on.

Every dispatched request holds a `LoadTicket` from `begin` to `end`: its prompt counts as queued prefill tokens
on the worker that prefills it until its first token (`progress`), and as a running request plus its KV blocks
(shared prompt blocks once per worker) on its decode worker until it ends.  No polling: the numbers change only
when the router itself dispatches, streams or ends a request, so they are exact at every dispatch decision.

`has_room` is the saturation test (separate prefill and decode saturation): a decode worker has room when it
is under `max_running` requests and `max_kv_fraction` of its KV blocks (from its heartbeats), and the request's
prompt can be prefilled on it or on a prefill worker under `max_prefill_queue_tokens`.  Priority > 0 may use
`priority_headroom` above those limits (whole slots).  Pure logic (no Ray, no asyncio).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

from disagg.protocol import Tier
from disagg.router.admission import CapacityConfig
from disagg.router.decision import Decision
from disagg.router.health import HealthMonitor
from disagg.router.policy import WorkerLoad
from disagg.stats import WorkerStats
from disagg.utils import cdiv


@dataclass
class LoadTicket:
    """One in-flight request's share of its workers' load."""

    prefilling: str
    decode: str
    num_prompt_tokens: int
    blocks: int
    queued: bool = True
    hashes: list[int] = field(default_factory=list)  # its full prompt blocks (shared ones count once per worker)
    max_tokens: int = 0
    generated: int = 0
    compute_tokens: int = 0  # of the prompt, what the router expects the prefilling worker to compute (uncached)


def _left(max_tokens: int, generated: int) -> int:
    return max(0, max_tokens - generated)


class LoadBook:
    def __init__(
        self,
        loads: dict[str, WorkerLoad],
        health: HealthMonitor,
        capacity: CapacityConfig,
        block_size: int,
        prefill: Iterable[str],
        lock: threading.Lock,
    ) -> None:
        self.loads, self.health, self.capacity = loads, health, capacity
        self.block_size = block_size
        self.prefill = list(prefill)
        self._lock = lock  # the router core's: loads are read while routing under it
        self.flexible = False  # flexible workers (policy.py): without them there are no takers

    # ------------------------------------------------------------------ accounting
    def begin(
        self, decision: Decision, num_prompt_tokens: int, hashes: list[int] | None = None, max_tokens: int = 0
    ) -> LoadTicket:
        """Count a dispatched request against its workers until `end` (the prompt is queued prefill work until
        its first token, then its output up to `max_tokens` is decode work left).  `hashes`: its full prompt
        blocks, so blocks shared with other in-flight requests on the same worker count once (omitted: every
        block counts)."""
        hashes = list(hashes or [])
        ticket = LoadTicket(
            decision.prefill_worker or decision.decode_worker,
            decision.decode_worker,
            num_prompt_tokens,
            cdiv(num_prompt_tokens, self.block_size),
            hashes=hashes,
            max_tokens=max_tokens,
            compute_tokens=num_prompt_tokens - decision.predicted_cached_tokens(num_prompt_tokens, self.block_size),
        )
        with self._lock:
            self.loads[ticket.prefilling].queued_prefill_tokens += num_prompt_tokens
            self.loads[ticket.prefilling].queued_compute_tokens += ticket.compute_tokens
            load = self.loads[ticket.decode]
            load.active_requests += 1
            load.add_blocks(hashes, ticket.blocks - len(hashes))
        return ticket

    def progress(self, ticket: LoadTicket, num_generated: int) -> None:
        """`num_generated` tokens are out: the prompt left the prefill queue; the request holds more blocks."""
        blocks = cdiv(ticket.num_prompt_tokens + num_generated, self.block_size)
        with self._lock:
            load = self.loads[ticket.decode]
            counted = 0 if ticket.queued else _left(ticket.max_tokens, ticket.generated)  # its decode work so far
            if ticket.queued:
                self.loads[ticket.prefilling].queued_prefill_tokens -= ticket.num_prompt_tokens
                self.loads[ticket.prefilling].queued_compute_tokens -= ticket.compute_tokens
                ticket.queued = False
                load.decoding += 1
            load.decode_tokens_left += _left(ticket.max_tokens, num_generated) - counted
            load.add_blocks([], blocks - ticket.blocks)
        ticket.blocks, ticket.generated = blocks, num_generated

    def end(self, ticket: LoadTicket) -> None:
        with self._lock:
            load = self.loads[ticket.decode]
            if ticket.queued:
                self.loads[ticket.prefilling].queued_prefill_tokens -= ticket.num_prompt_tokens
                self.loads[ticket.prefilling].queued_compute_tokens -= ticket.compute_tokens
                ticket.queued = False
            else:
                load.decoding -= 1
                load.decode_tokens_left -= _left(ticket.max_tokens, ticket.generated)
            load.active_requests -= 1
            load.remove_blocks(ticket.hashes, ticket.blocks - len(ticket.hashes))
            ticket.blocks = 0
            ticket.hashes = []

    # ------------------------------------------------------------------ saturation
    def has_room(self, name: str, num_tokens: int, priority: int = 0) -> bool:
        """Whether decode worker `name` can take a request now: KV and slot room, and prefill room on it or on a
        prefill worker.  Requests with priority > 0 may use the headroom above the limits, so urgent work does
        not wait for a slot behind background load."""
        scale = 1.0 + (self.capacity.priority_headroom if priority > 0 else 0.0)
        if not self.health.routable(name) or not self._room_to_decode(name, cdiv(num_tokens, self.block_size), scale):
            return False
        return self._room_to_prefill(name, scale) or any(
            self.health.routable(p) and self._room_to_prefill(p, scale) for p in self.prefill
        )

    def takers(
        self,
        eligible: Callable[[str], bool],
        num_tokens: int,
        changing: Container[str],
        priority: int = 0,
    ) -> list[WorkerLoad]:
        """Flexible workers: the prefill workers that may serve a request whole - eligible, with room for it, and
        not changing role (a drain would wait on the requests it takes); none when workers are not flexible."""
        if not self.flexible:
            return []
        return [
            self.loads[n]
            for n in self.prefill
            if eligible(n) and n not in changing and self.has_room(n, num_tokens, priority)
        ]

    def _room_to_decode(self, name: str, blocks: int, scale: float) -> bool:
        load, cap = self.loads[name], self.capacity
        if load.active_requests == 0:
            return True  # an idle worker always takes one request, however large
        stats = self.health.workers[name].stats
        total = stats.kv_blocks_total if stats is not None else None
        # whole slots: a 25% headroom on a 1-slot worker is no extra slot
        return load.active_requests < int(cap.max_running * scale) and (
            total is None or load.active_blocks + blocks <= total * min(1.0, cap.max_kv_fraction * scale)
        )

    def _room_to_prefill(self, name: str, scale: float) -> bool:
        queued = self.loads[name].queued_prefill_tokens
        return queued == 0 or queued < self.capacity.max_prefill_queue_tokens * scale


def tier_costs(stats: WorkerStats, block_size: int) -> dict[Tier, float] | None:
    """Each tier's measured load time per block over the worker's prefill time per block (None: no prefill
    measured yet); the policy treats a tier at >= 1 as worth nothing."""
    per_token = stats.prefill_s_per_token
    if not per_token:
        return None
    recompute = per_token * block_size
    loads = stats.tier_load_s_per_block
    return {tier: loads[tier] / recompute for tier in (Tier.CPU, Tier.DISK) if loads.get(tier) is not None}
