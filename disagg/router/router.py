"""Router core: worker registry, KV index upkeep, per-request routing and load accounting.

Thread-safe (one lock): the HTTP server's event loop routes requests while the router actor's thread applies
KV event batches.  Worker handles are opaque here (Ray actor handles in production); `stream_request` does
the actual prefill -> transfer -> decode call chain.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from disagg.cluster.client import stream_request
from disagg.protocol import KVEventBatch, Request, TokenDelta, hash_prompt_blocks
from disagg.router.index import PrefixIndex
from disagg.router.policy import Decision, PolicyConfig, RoutingPolicy, WorkerLoad

log = logging.getLogger(__name__)


@dataclass
class LoadTicket:
    """One in-flight request's share of its workers' load."""

    prefilling: str
    decode: str
    num_prompt_tokens: int
    blocks: int
    queued: bool = True


@dataclass
class RoutedRequest:
    request_id: str
    decision: Decision


class RouterCore:
    def __init__(self, prefill: dict[str, Any], decode: dict[str, Any], policy: PolicyConfig | None = None,
                 block_size: int = 16, request_snapshot: Callable[[str], None] | None = None) -> None:
        if not decode:
            raise ValueError("the router needs at least one decode (or aggregated) worker")
        self.prefill, self.decode = prefill, decode
        self.block_size = block_size
        self.policy = RoutingPolicy(policy, block_size)
        self.index = PrefixIndex()
        self.loads = {name: WorkerLoad(name) for name in [*prefill, *decode]}
        for name in self.loads:
            self.index.add_worker(name)
        self.decisions: deque[RoutedRequest] = deque(maxlen=10_000)
        self._request_snapshot = request_snapshot
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ KV events
    def on_kv_events(self, batch: KVEventBatch) -> bool:
        """Apply a worker's batch; on a gap, ask that worker for a snapshot. Returns whether it applied."""
        with self._lock:
            applied = self.index.apply(batch)
        if not applied and not batch.snapshot and self._request_snapshot is not None:
            self._request_snapshot(batch.worker)
        return applied

    # ------------------------------------------------------------------ routing
    def route(self, request: Request, session: str | None = None) -> Decision:
        hashes = hash_prompt_blocks(request.prompt_token_ids, self.block_size)
        with self._lock:
            matches = self.index.match(hashes)
            decision = self.policy.choose(len(request.prompt_token_ids), matches,
                                          [self.loads[n] for n in self.decode], [self.loads[n] for n in self.prefill],
                                          session)
            self.decisions.append(RoutedRequest(request.request_id, decision))
        return decision

    # ------------------------------------------------------------------ load accounting
    def begin(self, decision: Decision, num_prompt_tokens: int) -> "LoadTicket":
        """Count a dispatched request against its workers until `end` (the prompt is queued prefill work until
        its first token)."""
        ticket = LoadTicket(decision.prefill_worker or decision.decode_worker, decision.decode_worker,
                            num_prompt_tokens, -(-num_prompt_tokens // self.block_size))
        with self._lock:
            self.loads[ticket.prefilling].queued_prefill_tokens += num_prompt_tokens
            self.loads[ticket.decode].active_requests += 1
            self.loads[ticket.decode].active_blocks += ticket.blocks
        return ticket

    def progress(self, ticket: "LoadTicket", num_generated: int) -> None:
        """`num_generated` tokens are out: the prompt left the prefill queue; the request holds more blocks."""
        blocks = -(-(ticket.num_prompt_tokens + num_generated) // self.block_size)
        with self._lock:
            if ticket.queued:
                self.loads[ticket.prefilling].queued_prefill_tokens -= ticket.num_prompt_tokens
                ticket.queued = False
            self.loads[ticket.decode].active_blocks += blocks - ticket.blocks
        ticket.blocks = blocks

    def end(self, ticket: "LoadTicket") -> None:
        with self._lock:
            if ticket.queued:
                self.loads[ticket.prefilling].queued_prefill_tokens -= ticket.num_prompt_tokens
                ticket.queued = False
            self.loads[ticket.decode].active_requests -= 1
            self.loads[ticket.decode].active_blocks -= ticket.blocks
            ticket.blocks = 0

    # ------------------------------------------------------------------ serving
    async def generate(self, request: Request, session: str | None = None) -> AsyncIterator[TokenDelta]:
        decision = self.route(request, session)
        ticket = self.begin(decision, len(request.prompt_token_ids))
        prefill_handle = self.prefill[decision.prefill_worker] if decision.prefill_worker else None
        generated = 0
        try:
            async for delta in stream_request(request, prefill_handle, self.decode[decision.decode_worker]):
                generated += len(delta.token_ids)
                self.progress(ticket, generated)
                yield delta
        finally:
            self.end(ticket)

    def decision_of(self, request_id: str) -> Decision | None:
        with self._lock:
            for routed in reversed(self.decisions):  # recent requests sit at the end
                if routed.request_id == request_id:
                    return routed.decision
        return None

    def recent_decisions(self, n: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self.decisions)[-n:]
        return [{"request_id": r.request_id, "decode": r.decision.decode_worker, "prefill": r.decision.prefill_worker,
                 "overlap_blocks": r.decision.overlap_blocks, "reason": r.decision.reason} for r in items]
