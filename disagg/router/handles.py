"""WorkerHandle: what the router core needs from a worker, as a protocol (no Ray here).

`cluster/handles.py` implements it over Ray actor handles; tests implement it in-process.  Every call either
returns, or raises one of the project's errors: `WorkerLost` (the worker is dead or unreachable),
`DeadlineExceeded` (no answer in time), `InvalidRequest` (the worker refused the input).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from disagg.protocol import KVEventBatch, KVEventPage, PrefillResult, Request, Role, SleepReport, TokenDelta
from disagg.stats import Heartbeat


@dataclass
class Attached:
    """A journaled stream a relay attached to (`WorkerHandle.attach`): the request as `worker` runs it (after a
    migration its resume_token_ids are the output an earlier worker produced) and its deltas from the position
    asked for.  Closing `deltas` early aborts the request on the worker, as for `generate`; an `Attached` dropped
    unread leaves the stream to the worker's orphan grace."""

    worker: str
    request: Request
    deltas: AsyncGenerator[TokenDelta, None]


class WorkerHandle(Protocol):
    name: str

    async def heartbeat(self, timeout_s: float) -> Heartbeat: ...

    async def prefill(self, request: Request, timeout_s: float) -> PrefillResult: ...

    async def export_prefix(self, request: Request, timeout_s: float) -> PrefillResult | None:
        """Lease the leading blocks of the request's prompt this worker holds (device or CPU tier)."""

    def generate(self, request: Request, remote: PrefillResult | None) -> AsyncGenerator[TokenDelta, None]:
        """Stream the request's deltas; closing the iterator early aborts the request on the worker."""

    async def attach(self, request_id: str, start: int, tenant: str | None, timeout_s: float) -> Attached:
        """Follow the journaled stream of `request_id` (started by any relay) after its first `start` tokens;
        StreamNotFound when the worker has none this tenant may read."""

    async def abort(self, request_id: str) -> None: ...

    async def release(self, request_id: str) -> None:
        """Free a lease this worker holds for `request_id` (the reader fell back, or was cancelled)."""

    async def kv_snapshot(self, timeout_s: float) -> KVEventBatch: ...

    async def kv_events(self, incarnation: str, after_seq: int, timeout_s: float) -> KVEventPage:
        """The worker's KV event batches after `after_seq` of `incarnation` (a long poll: waits up to `timeout_s`)."""

    async def layout(self, timeout_s: float) -> bytes: ...

    async def set_peers(self, layouts: list[bytes], timeout_s: float) -> None: ...

    async def set_role(self, role: Role, timeout_s: float) -> None:
        """The worker's role changed (router/roles.py): it reports it in heartbeats and spans from now on."""

    async def kill(self) -> None:
        """Kill the worker's process so it restarts (stuck or failing workers)."""

    async def sleep(self, timeout_s: float) -> SleepReport:
        """Give its KV memory back (its model sleeps: engine/sleep.py); Conflict while blocks are in use."""

    async def wake(self, timeout_s: float) -> SleepReport: ...
