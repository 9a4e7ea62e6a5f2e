"""One attempt at serving a request through the workers the router chose: the KV another worker contributes
(a remote prefill, or a peer's cached prefix, with the fallback to a local prefill when that fails), the stream
from the decode worker (WorkerLost when the worker dies, breaks the stream, or sends no first token in time), and
the release of the contributing worker's lease off the request's path.

`RouterCore.generate` (router/router.py) owns the request's life - admission, routing, migration after a
WorkerLost; this module owns the worker calls of one attempt.  No Ray and no HTTP: workers are `WorkerHandle`s.
It is given what it uses (the handles, the health monitor, the load book, the counters, the deadlines, and a
callback that wakes the admission queue), never the core itself.

Lifecycle: an AttemptRunner lives as long as its core; background lease releases it starts run until done (each
bounded by `release_timeout_s`), and `drain_releases()` waits for them on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping

from opentelemetry import trace

from disagg.errors import DeadlineExceeded, InvalidRequest, ServiceUnavailable, TransferFailed, WorkerLost
from disagg.protocol import FallbackKind, PrefillResult, Request, RouterCounters, ServePath, TokenDelta
from disagg.router.core_config import RouterCoreConfig
from disagg.router.handles import WorkerHandle
from disagg.router.health import HealthMonitor
from disagg.router.load import LoadBook, LoadTicket
from disagg.router.policy import Decision

log = logging.getLogger(__name__)


class AttemptRunner:
    def __init__(
        self,
        handles: Mapping[str, WorkerHandle | None],
        health: HealthMonitor,
        book: LoadBook,
        counters: RouterCounters,
        config: RouterCoreConfig,
        wake_admission: Callable[[], None],
    ) -> None:
        """`wake_admission`: called when a prompt leaves its worker's prefill queue (queued requests may fit now)."""
        self.handles, self.health, self.book, self.counters = handles, health, book, counters
        self.config, self.wake_admission = config, wake_admission
        self._releases: dict[str, asyncio.Task] = {}  # background lease releases by request id, until done

    async def serve(
        self,
        request: Request,
        decision: Decision,
        ticket: LoadTicket,
        migrated: bool,
        span: trace.Span = trace.INVALID_SPAN,
    ) -> AsyncGenerator[TokenDelta, None]:
        decode = self.handle(decision.decode_worker)
        if (pending := self._releases.get(request.request_id)) is not None:
            await pending  # a migrated request's earlier lease goes first: a late release would free the new one
        remote, owner = await self._remote_kv(request, decision, span)
        if migrated:
            path = ServePath.MIGRATED
        elif remote is None:
            path = ServePath.FALLBACK if (decision.prefill_worker or decision.peer_worker) else ServePath.LOCAL
        else:
            path = ServePath.DISAGGREGATED if decision.prefill_worker else ServePath.PEER_PREFIX
        self.counters.served(path)
        stream = decode.generate(request, remote)
        timeout: float | None = self.config.stream_start_timeout_s
        generated = 0
        try:
            while True:
                delta = await self._next(stream, timeout, decision.decode_worker)
                timeout = None
                generated += len(delta.token_ids)
                self.book.progress(ticket, generated)
                if generated == len(delta.token_ids):
                    self.wake_admission()  # the prompt left the prefill queue
                yield delta
                if delta.finished:
                    return
        finally:
            await stream.aclose()
            if owner is not None:
                await self._release_soon(owner, request.request_id)

    async def _next(self, stream: AsyncGenerator[TokenDelta, None], timeout: float | None, worker: str) -> TokenDelta:
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

    async def _remote_kv(
        self, request: Request, decision: Decision, span: trace.Span = trace.INVALID_SPAN
    ) -> tuple[PrefillResult | None, WorkerHandle | None]:
        """The KV another worker contributes: a remote prefill's result, or a peer's cached prefix (or none)."""
        name = decision.prefill_worker or decision.peer_worker
        if name is None:
            return None, None
        handle = self.handle(name)
        try:
            call: Awaitable[PrefillResult | None]
            if decision.prefill_worker:
                call = handle.prefill(request, self.config.prefill_timeout_s)
            else:
                call = handle.export_prefix(request, self.config.export_timeout_s)
            result = await self._while_alive(call, name)
        except InvalidRequest:
            raise
        except (WorkerLost, DeadlineExceeded, TransferFailed) as exc:
            kind = FallbackKind.PREFILL if decision.prefill_worker else FallbackKind.PEER_PREFIX
            self.counters.fell_back(kind)
            span.add_event("fallback", {"disagg.kind": kind.value, "disagg.worker": name, "disagg.error": exc.message})
            log.warning(
                "%s on %s failed for %s (%s); computing on %s",
                kind.value,
                name,
                request.request_id,
                exc.message,
                decision.decode_worker,
            )
            await self._release_soon(handle, request.request_id)
            return None, None
        return result, (handle if result is not None else None)

    async def _release_soon(self, handle: WorkerHandle, request_id: str) -> None:
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
