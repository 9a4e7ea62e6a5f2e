"""Attaching to a journaled stream (issue 23): a client reconnects to any relay, which follows the stream on the
worker that generates it (its TokenJournal, cluster/journal.py) instead of starting a second generation.

- `attach`: the worker named in the client's resume token (SSE Last-Event-ID, http/resume.py).  It must be in
  service in this core's health view (READY, or DRAINED: finishing its work); a worker out of routing or restarted
  has no journal to offer, which is StreamNotFound, as are an unknown, expired or other tenant's stream.
- `find`: which worker holds a request id (a repeated Idempotency-Key names no worker): every worker in service is
  asked in turn; None when none has it.

No Ray and no HTTP: workers are `WorkerHandle`s.  A resumed stream is not migrated if its worker dies (the client
gets an error event and may start over), and its load is not counted again by this core.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from disagg.errors import DeadlineExceeded, StreamNotFound, WorkerLost
from disagg.protocol import WorkerState
from disagg.router.core_config import RouterCoreConfig
from disagg.router.handles import Attached, WorkerHandle
from disagg.router.health import HealthMonitor

log = logging.getLogger(__name__)
IN_SERVICE = frozenset({WorkerState.READY, WorkerState.DRAINED})


class Resumer:
    def __init__(
        self, handles: Mapping[str, WorkerHandle | None], health: HealthMonitor, config: RouterCoreConfig
    ) -> None:
        self.handles, self.health, self.config = handles, health, config

    def _in_service(self, worker: str) -> WorkerHandle | None:
        w = self.health.workers.get(worker)
        return self.handles.get(worker) if w is not None and w.state in IN_SERVICE else None

    async def attach(self, worker: str, request_id: str, tenant: str | None) -> Attached:
        """The stream of `request_id` on `worker`, from its first token (the relay replays what the client has)."""
        handle = self._in_service(worker)
        if handle is None:
            raise StreamNotFound(f"no stream {request_id!r} to resume")
        return await handle.attach(request_id, 0, tenant, self.config.attach_timeout_s)

    async def find(self, request_id: str, tenant: str | None) -> Attached | None:
        """The stream of `request_id` on whichever worker in service holds it; None if none does."""
        for worker in self.health.workers:
            if self._in_service(worker) is None:
                continue
            try:
                return await self.attach(worker, request_id, tenant)
            except StreamNotFound:
                continue
            except (WorkerLost, DeadlineExceeded) as exc:  # it may hold the stream, but cannot say now
                log.info("looking for %s on %s: %s", request_id, worker, exc.message)
        return None
