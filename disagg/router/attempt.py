"""The worker calls of one attempt at serving a request, for the Flight's asyncio driver (router/drive.py): the KV
another worker contributes (a remote prefill, or a peer's cached prefix), given up on as soon as that worker
leaves routing; the next delta of the decode worker's stream (WorkerLost when the worker dies, breaks the stream,
or sends no first token in time); and the release of a contributing worker's lease off the request's path.  A
worker whose call fails with `OutputCorrupt` (impossible output: NaN logits) is taken out of routing at once.

What to do when a call fails (fall back, migrate, give up) is the Flight's rule (router/flight.py), not this
module's.  No Ray and no HTTP: workers are `WorkerHandle`s.  It is given what it uses (the handles, the health
monitor, the counters, the deadlines), never the core itself.

Lifecycle: an AttemptRunner lives as long as its core; background lease releases it starts run until done (each
bounded by `release_timeout_s`), and `drain_releases()` waits for them on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Mapping

from disagg.errors import DeadlineExceeded, OutputCorrupt, ServiceUnavailable, WorkerLost
from disagg.protocol import FallbackKind, PrefillResult, Request, TokenDelta
from disagg.router.core_config import RouterCoreConfig
from disagg.router.handles import WorkerHandle
from disagg.router.health import HealthMonitor
from disagg.stats import RouterCounters

log = logging.getLogger(__name__)


class AttemptRunner:
    def __init__(
        self,
        handles: Mapping[str, WorkerHandle | None],
        health: HealthMonitor,
        counters: RouterCounters,
        config: RouterCoreConfig,
    ) -> None:
        self.handles, self.health, self.counters, self.config = handles, health, counters, config
        self._releases: dict[str, asyncio.Task] = {}  # background lease releases by request id, until done

    async def released(self, request_id: str) -> None:
        """Wait for this request's background lease release, if one is in flight."""
        if (pending := self._releases.get(request_id)) is not None:
            await pending

    async def next_delta(
        self, stream: AsyncGenerator[TokenDelta, None], timeout: float | None, worker: str
    ) -> TokenDelta:
        """The next delta; WorkerLost if the worker is taken out of routing meanwhile, the stream breaks, or the
        first delta does not come within `timeout`."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        step = asyncio.ensure_future(stream.__anext__())
        try:
            while True:
                if self.health.is_dead(worker):
                    raise WorkerLost(f"{worker} died while streaming", worker=worker)
                wait = self.config.death_poll_s
                if deadline is not None:
                    wait = min(wait, deadline - asyncio.get_running_loop().time())
                    if wait <= 0:
                        raise WorkerLost(
                            f"no first token from {worker} within {timeout:.0f}s",
                            worker=worker,
                            code="stream_start_timeout",
                        )
                done, _ = await asyncio.wait({step}, timeout=wait)
                if done:
                    try:
                        return step.result()
                    except StopAsyncIteration:
                        raise WorkerLost(f"{worker} ended the stream early", worker=worker) from None
                    except OutputCorrupt as exc:
                        self.health.take_out(worker, exc.message)
                        raise
        finally:
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)

    async def _while_alive(self, call, worker: str):
        """Await a worker call, giving up with WorkerLost as soon as the worker is taken out of routing (a hung
        worker's call would otherwise sit out its whole deadline)."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.config.death_poll_s)
                if done:
                    return task.result()
                if self.health.is_dead(worker):
                    raise WorkerLost(f"{worker} died during the call", worker=worker)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def handle(self, name: str) -> WorkerHandle:
        handle = self.handles[name]
        if handle is None:
            raise ServiceUnavailable(f"worker {name} has no handle (a routing-only router)", code="no_handle")
        return handle

    async def fetch_kv(self, worker: str, request: Request, source: FallbackKind) -> PrefillResult | None:
        """A remote prefill's result, or a peer's cached prefix (None: it has nothing to offer)."""
        handle = self.handle(worker)
        call: Awaitable[PrefillResult | None]
        if source is FallbackKind.PREFILL:
            call = handle.prefill(request, self.config.prefill_timeout_s)
        else:
            call = handle.export_prefix(request, self.config.export_timeout_s)
        try:
            result: PrefillResult | None = await self._while_alive(call, worker)
        except OutputCorrupt as exc:  # its NaN logits fail the next request too: out of routing now
            self.health.take_out(worker, exc.message)
            raise
        return result

    async def release_soon(self, handle: WorkerHandle, request_id: str) -> None:
        """Release off the request's path: the owner answers between engine steps (seconds, with long prefills
        in them), and the client's last chunk or its local-prefill fallback must not wait for that.  Bounded:
        past `max_background_releases` in flight, the caller waits for this one."""
        if len(self._releases) >= self.config.max_background_releases:
            await self._release(handle, request_id)
            return
        task = asyncio.get_running_loop().create_task(self._release(handle, request_id))
        self._releases[request_id] = task
        task.add_done_callback(
            lambda t: self._releases.pop(request_id, None) if self._releases.get(request_id) is t else None
        )

    async def drain_releases(self) -> None:
        """On shutdown: let background releases finish (each is bounded by `release_timeout_s`)."""
        await asyncio.gather(*self._releases.values(), return_exceptions=True)

    async def _release(self, handle: WorkerHandle, request_id: str) -> None:
        """Best effort: normally the read's notification already released it; a dead owner's lease died with it."""
        try:
            await asyncio.wait_for(handle.release(request_id), self.config.release_timeout_s)
        except (WorkerLost, DeadlineExceeded, asyncio.TimeoutError) as exc:
            log.info("release of %s on %s: %s", request_id, handle.name, exc)
