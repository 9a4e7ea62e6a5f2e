"""In-process workers for router tests: a real EngineWorker (real engine, in-process transport) behind the
WorkerHandle protocol, with knobs to make it die or hang the way a killed or SIGSTOPped process would.

This stands in for Ray only; the engine, scheduler, KV seam and router core under test are the real ones.  The
same faults on real Ray actors and real processes are tested in test_faults.py.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from disagg.cluster.journal import JournalConfig
from disagg.cluster.worker import EngineWorker, WorkerConfig
from disagg.config import EngineConfig
from disagg.errors import DeadlineExceeded, WorkerLost
from disagg.kv.tier_config import TierConfig
from disagg.protocol import KVEventBatch, KVEventPage, PrefillResult, Request, Role, SleepReport, TokenDelta
from disagg.router.handles import Attached
from disagg.stats import Heartbeat
from tests.fake_transport import LocalTransport


def local_worker(name: str, model_dir, role: Role = Role.BOTH, tiers: TierConfig | None = None,
                 journal: JournalConfig | None = None, **engine) -> EngineWorker:
    cfg = dict(model=str(model_dir), num_blocks=64, block_size=16, max_model_len=512, num_threads=1)
    cfg.update(engine)
    return EngineWorker(WorkerConfig(name=name, role=role, engine=EngineConfig(**cfg), tiers=tiers,
                                     transfer_timeout_s=2.0, journal=journal or JournalConfig()),
                        transport_factory=lambda agent, _engine: LocalTransport(agent))


class LocalWorkerHandle:
    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker
        self.name = worker.config.name
        self.dead = False  # every call fails with WorkerLost, streams break at their next token
        self.hung = False  # every call times out (a stopped process)
        self.kills = 0
        self.restarted_with: EngineWorker | None = None
        self.slow_stream_s = 0.0  # pause between streamed tokens (keeps a stream in flight for a test)
        self.relay_alive = True  # False: the router using this handle 'died' (its streams end without an abort)

    def _check(self) -> None:
        if self.dead:
            raise WorkerLost(f"{self.name} is dead", worker=self.name)

    async def _guard(self, coro, timeout_s: float | None):
        if self.dead:
            coro.close()
            self._check()
        if self.hung:
            coro.close()
            await asyncio.sleep(timeout_s or 0)
            raise DeadlineExceeded(f"{self.name} did not answer")
        try:
            return await asyncio.wait_for(coro, timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"{self.name} did not answer within {timeout_s}s") from None

    async def heartbeat(self, timeout_s: float) -> Heartbeat:
        async def hb():
            return Heartbeat.from_wire(self.worker.heartbeat())
        return await self._guard(hb(), timeout_s)

    async def prefill(self, request: Request, timeout_s: float) -> PrefillResult:
        return PrefillResult.from_wire(await self._guard(self.worker.prefill(request.to_wire()), timeout_s))

    async def export_prefix(self, request: Request, timeout_s: float) -> PrefillResult | None:
        data = await self._guard(self.worker.export_prefix(request.to_wire()), timeout_s)
        return PrefillResult.from_wire(data) if data is not None else None

    def generate(self, request: Request, remote: PrefillResult | None) -> AsyncIterator[TokenDelta]:
        args = (request.to_wire(), remote.to_wire() if remote is not None else None)
        return self._relay(lambda: self.worker.generate(*args), request.request_id)

    async def attach(self, request_id: str, start: int, tenant, timeout_s: float) -> Attached:
        self._check()
        stream = self.worker.attach(request_id, start, tenant)
        try:
            first = await asyncio.wait_for(stream.__anext__(), timeout_s)
        except BaseException:
            await stream.aclose()
            raise
        return Attached(self.name, Request.from_wire(first), self._relay(lambda: stream, request_id))

    async def _relay(self, start, request_id: str) -> AsyncIterator[TokenDelta]:
        """Like RayWorkerHandle: a stream closed before its end aborts the request on the worker, unless this
        relay 'died' (`relay_alive` False: a killed router process tells the worker nothing)."""
        self._check()
        stream = start()
        finished = False
        try:
            async for data in stream:
                if self.slow_stream_s:
                    await asyncio.sleep(self.slow_stream_s)
                self._check()
                while self.hung:
                    await asyncio.sleep(0.01)
                delta = TokenDelta.from_wire(data)
                finished = delta.finished
                yield delta
        finally:
            await stream.aclose()
            if not finished and self.relay_alive:
                await self.worker.abort(request_id)

    async def abort(self, request_id: str) -> None:
        await self._guard(self.worker.abort(request_id), 5.0)

    async def release(self, request_id: str) -> None:
        await self._guard(self.worker.release(request_id), 5.0)

    async def kv_snapshot(self, timeout_s: float) -> KVEventBatch:
        return KVEventBatch.from_wire(await self._guard(self.worker.kv_snapshot(), timeout_s))

    async def kv_events(self, incarnation: str, after_seq: int, timeout_s: float) -> KVEventPage:
        data = await self._guard(self.worker.kv_events(incarnation, after_seq, timeout_s), timeout_s + 5.0)
        return KVEventPage.from_wire(data)

    async def layout(self, timeout_s: float) -> bytes:
        return await self._guard(self.worker.layout(), timeout_s)

    async def set_peers(self, layouts: list[bytes], timeout_s: float) -> None:
        await self._guard(self.worker.set_peers(layouts), timeout_s)

    async def set_role(self, role, timeout_s: float) -> None:
        await self._guard(self.worker.set_role(role.value), timeout_s)

    async def sleep(self, timeout_s: float) -> SleepReport:
        return SleepReport.from_wire(await self._guard(self.worker.sleep(), timeout_s))

    async def wake(self, timeout_s: float) -> SleepReport:
        return SleepReport.from_wire(await self._guard(self.worker.wake(), timeout_s))

    async def kill(self) -> None:
        self.kills += 1
        self.dead = True

    def restart(self, worker: EngineWorker) -> None:
        """What Ray does after a death: the same handle now reaches a new incarnation."""
        self.worker, self.dead, self.hung = worker, False, False
