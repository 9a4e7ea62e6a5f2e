"""An engine worker as an asyncio service: the body of the Ray actor (Ray-free, so it can be driven directly).

All engine and NIXL calls run on one executor thread, in order, so the engine is never touched concurrently; the
event loop only routes TokenDeltas to per-request queues.  Roles:
  prefill  `prefill()` runs a request to its first token and leases the blocks until the decode side has read
           them (NIXL notification) or the lease expires.
  decode   `generate(request, prefill_result)` reads the blocks it lacks over NIXL, then decodes and streams;
           a failed or timed-out read falls back to prefilling locally.
  both     `generate(request)` with no prefill result: an ordinary aggregated engine.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from disagg.config import EngineConfig
from disagg.engine.block_pool import NoFreeBlocksError
from disagg.engine.engine import LLMEngine
from disagg.protocol import KVEvent, KVEventBatch, PrefillResult, Request, TokenDelta
from disagg.transfer.base import KVLayout, TransferError, TransferState
from disagg.transfer.nixl import NixlTransport

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode", "both")


@dataclasses.dataclass
class WorkerConfig:
    name: str
    role: str = "both"
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)  # EngineConfig fields
    transfer_timeout_s: float = 10.0
    idle_sleep_s: float = 0.002


class EngineWorker:
    def __init__(self, config: WorkerConfig) -> None:
        if config.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {config.role!r}")
        self.config = config
        self.engine = LLMEngine(EngineConfig(**config.engine))
        self.transport = NixlTransport(config.name, self.engine.device)
        self.transport.register(self.engine.runner.kv_cache.tensor)
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{config.name}")
        self._queues: dict[str, asyncio.Queue[TokenDelta]] = {}
        self._loop_task: asyncio.Task | None = None
        self._event_sink: Any = None  # the router actor; receives KVEventBatch messages
        self._event_seq = -1
        self.counters = {"transfer_failures": 0, "fallback_no_blocks": 0, "reads": 0, "local_only_imports": 0,
                         "read_seconds": 0.0}

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                deltas, events, busy = await self._call(self._tick)
            except Exception:  # never let one bad step kill the worker's loop
                log.exception("engine step failed")
                deltas, events, busy = [], None, False
            if events is not None and self._event_sink is not None:
                self._event_sink.publish_kv_events.remote(events.to_wire())
            for delta in deltas:
                queue = self._queues.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
            if not busy:
                await asyncio.sleep(self.config.idle_sleep_s)

    def _tick(self) -> tuple[list[TokenDelta], KVEventBatch | None, bool]:
        """Executor thread: release leases the decode side is done with, expire stale ones, run one step,
        and collect the KV events since the last tick as one numbered batch."""
        for message in self.transport.notifications():
            self.engine.leases.release(message.decode())
        self.engine.leases.expire()
        busy = self.engine.has_unfinished()
        deltas = self.engine.step() if busy else []
        events = self.engine.drain_kv_events()
        batch = None
        if events:  # numbered even with no sink yet: the router then sees a gap and asks for a snapshot
            self._event_seq += 1
            batch = KVEventBatch.of(self.config.name, self._event_seq, events)
        return deltas, batch, busy

    # ------------------------------------------------------------------ control plane (msgpack in and out)
    async def ready(self) -> str:
        self._ensure_loop()
        return self.config.name

    async def layout(self) -> bytes:
        return self.transport.layout().to_wire()

    async def set_event_sink(self, sink: Any) -> None:
        self._event_sink = sink

    async def kv_snapshot(self) -> bytes:
        """Every block hash cached here now, numbered as the last batch published (events are idempotent)."""
        def snapshot() -> bytes:
            hashes = self.engine.pool.cached_hashes()
            return KVEventBatch.of(self.config.name, self._event_seq, [KVEvent("stored", hashes)],
                                   snapshot=True).to_wire()
        return await self._call(snapshot)

    async def add_peer(self, layout: bytes) -> None:
        await self._call(self.transport.add_peer, KVLayout.from_wire(layout))

    async def prefill(self, request: bytes) -> bytes:
        """Run the prompt to its first token; the blocks stay leased for the decode worker."""
        req = Request.from_wire(request)
        queue = self._open(req.request_id)
        try:
            first = dataclasses.replace(req.sampling, max_tokens=1, stop=[])
            await self._call(self.engine.add_request, req.request_id, req.prompt_token_ids, first, True)
            delta = await queue.get()
        finally:
            self._queues.pop(req.request_id, None)
        result = await self._call(self.engine.prefill_result, req.request_id, self.config.name,
                                  delta.token_ids[0], None)
        return result.to_wire()

    async def release(self, request_id: str) -> bool:
        """Free a request's leased blocks now (cancellation, or the decode side failed over)."""
        return await self._call(self.engine.leases.release, request_id)

    async def abort(self, request_id: str) -> bool:
        return await self._call(self.engine.abort, request_id)

    async def generate(self, request: bytes, prefill: bytes | None = None) -> AsyncIterator[bytes]:
        """Stream TokenDeltas (msgpack) for a request; with `prefill`, its KV is read from that worker first."""
        req = Request.from_wire(request)
        queue = self._open(req.request_id)
        finished = False
        try:
            if prefill is None:
                await self._call(self.engine.add_request, req.request_id, req.prompt_token_ids, req.sampling)
            else:
                await self._import(req, PrefillResult.from_wire(prefill))
            while not finished:
                delta = await queue.get()
                finished = delta.finished
                yield delta.to_wire()
        finally:
            self._queues.pop(req.request_id, None)
            if not finished:  # the caller went away: free the blocks
                await self._call(self.engine.abort, req.request_id)

    def _open(self, request_id: str) -> asyncio.Queue:
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._ensure_loop()
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    async def _import(self, req: Request, result: PrefillResult) -> None:
        rid = req.request_id
        try:
            plan = await self._call(self.engine.import_remote, rid, req.prompt_token_ids, req.sampling, result)
        except NoFreeBlocksError:
            self.counters["fallback_no_blocks"] += 1
            await self._call(self.engine.add_request, rid, req.prompt_token_ids, req.sampling)
            return
        try:
            if plan.remote_blocks:
                await self._read(result.agent_name, plan.remote_blocks, plan.local_blocks, rid)
            else:  # every block was already cached here: tell the prefill side it can let go
                self.counters["local_only_imports"] += 1
                await self._call(self.transport.notify, result.agent_name, rid.encode())
        except (TransferError, asyncio.TimeoutError, RuntimeError) as exc:
            log.warning("KV read for %s from %s failed (%s); prefilling locally", rid, result.agent_name, exc)
            self.counters["transfer_failures"] += 1
            await self._call(self.engine.abort_import, rid)
            return
        delta = await self._call(self.engine.commit_import, rid)
        self._queues[rid].put_nowait(delta)

    async def _read(self, peer: str, remote: list[int], local: list[int], request_id: str) -> None:
        start = time.monotonic()
        handle = await self._call(self.transport.read, peer, remote, local, request_id.encode())
        self.counters["reads"] += 1
        deadline = start + self.config.transfer_timeout_s
        try:
            while True:
                state = await self._call(self.transport.poll, handle)
                if state == TransferState.DONE:
                    self.counters["read_seconds"] += time.monotonic() - start
                    return
                if state == TransferState.FAILED:
                    raise TransferError(f"read from {peer} failed")
                if time.monotonic() > deadline:
                    raise TransferError(f"read from {peer} timed out after {self.config.transfer_timeout_s}s")
                await asyncio.sleep(0.0005)
        finally:
            await self._call(self.transport.release, handle)

    async def stats(self) -> dict[str, Any]:
        def collect() -> dict[str, Any]:
            e = self.engine
            return {"name": self.config.name, "role": self.config.role, "num_blocks": e.pool.num_blocks,
                    "free_blocks": e.pool.num_free_blocks, "leases": len(e.leases.leases),
                    "leases_expired": e.leases.num_expired, "running": len(e.scheduler.running),
                    "waiting": len(e.scheduler.waiting), "bytes_read": self.transport.bytes_read,
                    "prefix_hit_tokens": e.scheduler.stats.prefix_hit_tokens,
                    "prefix_query_tokens": e.scheduler.stats.prefix_query_tokens,
                    "preemptions": e.scheduler.stats.num_preemptions, **self.counters}
        return await self._call(collect)

    async def kv_block_bytes(self) -> int:
        return self.transport.layout().block_bytes
