"""RayWorkerHandle: the router's WorkerHandle protocol over a Ray actor handle.

Every call has a deadline; Ray's errors become the project's: an actor that died, is restarting or whose
process crashed -> WorkerLost; no answer in time -> DeadlineExceeded; the worker refusing the input (a
ValueError inside the actor) -> InvalidRequest.  `kill` SIGKILLs the worker's process directly when it runs on
this node (instant, even for a SIGSTOPped process), else asks Ray to kill it; either way Ray restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncGenerator, Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from disagg.errors import DeadlineExceeded, DisaggError, InternalError, InvalidRequest, StreamNotFound, WorkerLost
from disagg.protocol import KVEventBatch, KVEventPage, PrefillResult, Request, Role, SleepReport, TokenDelta
from disagg.router.handles import Attached
from disagg.stats import Heartbeat

log = logging.getLogger(__name__)
_LOST = (RayActorError, WorkerCrashedError, ObjectLostError)
_POLL_SLACK_S = 5.0  # a long poll's answer may take this much longer than its own wait (a busy worker's loop)


def translate(exc: BaseException, worker: str) -> DisaggError:
    """A Ray error (or a worker-side exception it carries) as the project's error."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, DisaggError):
        return exc.cause  # the worker's own error, not Ray's wrapper of it
    if isinstance(exc, DisaggError):
        return exc
    if isinstance(exc, _LOST):
        return WorkerLost(f"{worker}: {type(exc).__name__}", worker=worker)
    if isinstance(exc, (GetTimeoutError, asyncio.TimeoutError)):
        return DeadlineExceeded(f"{worker} did not answer in time")
    if isinstance(exc, RayTaskError):
        cause = exc.cause if exc.cause is not None else exc
        if isinstance(cause, DisaggError):
            return cause
        if isinstance(cause, ValueError):
            return InvalidRequest(str(cause))
        return InternalError(f"{worker}: {type(cause).__name__}: {cause}")
    if isinstance(exc, ValueError):
        return InvalidRequest(str(exc))
    return InternalError(f"{worker}: {type(exc).__name__}: {exc}")


class RayWorkerHandle:
    def __init__(self, name: str, actor: Any, node_id: str = "") -> None:
        self.name = name
        self.actor = actor
        self.node_id = node_id  # the node this handle is used from
        self._pid: int | None = None
        self._worker_node: str | None = None

    async def _call(self, method: str, *args: Any, timeout_s: float | None) -> Any:
        ref = getattr(self.actor, method).remote(*args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)
        except asyncio.TimeoutError:
            ray.cancel(ref)
            raise DeadlineExceeded(f"{self.name}.{method} did not answer within {timeout_s}s") from None
        except Exception as exc:
            raise translate(exc, self.name) from exc

    async def heartbeat(self, timeout_s: float) -> Heartbeat:
        hb = Heartbeat.from_wire(await self._call("heartbeat", timeout_s=timeout_s))
        self._pid, self._worker_node = hb.pid, hb.node_id
        return hb

    async def prefill(self, request: Request, timeout_s: float) -> PrefillResult:
        return PrefillResult.from_wire(await self._call("prefill", request.to_wire(), timeout_s=timeout_s))

    async def export_prefix(self, request: Request, timeout_s: float) -> PrefillResult | None:
        data = await self._call("export_prefix", request.to_wire(), timeout_s=timeout_s)
        return PrefillResult.from_wire(data) if data is not None else None

    def generate(self, request: Request, remote: PrefillResult | None) -> AsyncGenerator[TokenDelta, None]:
        args = (request.to_wire(), remote.to_wire() if remote is not None else None)
        return self._relay(lambda: self.actor.generate.remote(*args), request.request_id)

    async def attach(self, request_id: str, start: int, tenant: str | None, timeout_s: float) -> Attached:
        stream = self.actor.attach.remote(request_id, start, tenant)
        try:
            first = await asyncio.wait_for(self._first(stream), timeout_s)
        except BaseException as exc:
            ray.cancel(stream)
            if isinstance(exc, asyncio.TimeoutError):
                raise DeadlineExceeded(f"{self.name}.attach did not answer within {timeout_s}s") from None
            raise
        return Attached(self.name, Request.from_wire(first), self._relay(lambda: stream, request_id))

    async def _first(self, stream: Any) -> bytes:
        try:
            return await (await stream.__anext__())
        except StopAsyncIteration:
            raise StreamNotFound() from None
        except Exception as exc:
            raise translate(exc, self.name) from exc

    async def _relay(self, start: Callable[[], Any], request_id: str) -> AsyncGenerator[TokenDelta, None]:
        """A worker's stream of deltas; closed before its end, the request is aborted on the worker (the client
        went away from a live relay; a relay that dies sends nothing, and the worker's journal keeps it a while)."""
        stream = start()
        finished = False
        try:
            async for ref in stream:
                try:
                    delta = TokenDelta.from_wire(await ref)
                except Exception as exc:
                    raise translate(exc, self.name) from exc
                finished = delta.finished
                yield delta
        except DisaggError:
            raise
        except Exception as exc:  # the stream itself broke (the actor died between items)
            raise translate(exc, self.name) from exc
        finally:
            if not finished:
                ray.cancel(stream)
                try:  # the worker frees the request's blocks; if it is gone they went with it
                    await asyncio.wait_for(asyncio.wrap_future(self.actor.abort.remote(request_id).future()), 5.0)
                except (asyncio.TimeoutError, *_LOST, RayTaskError) as exc:
                    log.info("abort of %s on %s: %s", request_id, self.name, type(exc).__name__)

    async def abort(self, request_id: str) -> None:
        await self._call("abort", request_id, timeout_s=5.0)

    async def release(self, request_id: str) -> None:
        await self._call("release", request_id, timeout_s=5.0)

    async def kv_snapshot(self, timeout_s: float) -> KVEventBatch:
        return KVEventBatch.from_wire(await self._call("kv_snapshot", timeout_s=timeout_s))

    async def kv_events(self, incarnation: str, after_seq: int, timeout_s: float) -> KVEventPage:
        data = await self._call("kv_events", incarnation, after_seq, timeout_s, timeout_s=timeout_s + _POLL_SLACK_S)
        return KVEventPage.from_wire(data)

    async def layout(self, timeout_s: float) -> bytes:
        return await self._call("layout", timeout_s=timeout_s)

    async def set_peers(self, layouts: list[bytes], timeout_s: float) -> None:
        await self._call("set_peers", layouts, timeout_s=timeout_s)

    async def set_role(self, role: Role, timeout_s: float) -> None:
        await self._call("set_role", role.value, timeout_s=timeout_s)

    async def sleep(self, timeout_s: float) -> SleepReport:
        return SleepReport.from_wire(await self._call("sleep", timeout_s=timeout_s))

    async def wake(self, timeout_s: float) -> SleepReport:
        return SleepReport.from_wire(await self._call("wake", timeout_s=timeout_s))

    async def kill(self) -> None:
        if self._pid is not None and self._worker_node and self._worker_node == self.node_id:
            try:
                os.kill(self._pid, signal.SIGKILL)
                log.warning("killed %s (pid %d) so that it restarts", self.name, self._pid)
                return
            except ProcessLookupError:
                return  # already gone: Ray is restarting it
        ray.kill(self.actor, no_restart=False)
        log.warning("asked Ray to kill %s so that it restarts", self.name)
