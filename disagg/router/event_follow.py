"""Following the workers' KV events: one long poll per worker (`WorkerHandle.kv_events`), each batch applied to
the core's prefix index as it arrives.

The router pulls rather than having workers push to it, so every router replica - and a router Ray has just
restarted - follows every worker with nothing for the worker to subscribe or unsubscribe (cluster/event_feed.py
is the worker's side).  A batch lost to the feed's window, or a worker's restart (a new incarnation numbers from
0), shows as a gap in the sequence numbers: the index flags the worker and the health supervisor pulls a
snapshot, as for any gap.

Lifecycle: `start()` on the serving event loop starts one task per worker; `stop()` cancels them.  A poll that
fails (the worker is dead, restarting, or too busy to answer) is counted and retried after `event_retry_s`: the
health supervisor, not this loop, decides what a silent worker is.  No Ray and no HTTP here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from disagg.errors import DisaggError
from disagg.protocol import KVEventBatch
from disagg.router.handles import WorkerHandle
from disagg.utils import end_loops

log = logging.getLogger(__name__)


@dataclass
class FollowCounts:
    pages: int = 0  # answers received (with or without batches)
    batches: int = 0  # batches applied (or refused by the index for a gap)
    failures: int = 0  # polls that failed (retried after event_retry_s)


class EventFollowers:
    def __init__(
        self,
        handles: Mapping[str, WorkerHandle],
        apply: Callable[[KVEventBatch], object],
        poll_s: float,
        retry_s: float,
    ) -> None:
        self.handles = handles
        self.apply = apply
        self.poll_s, self.retry_s = poll_s, retry_s
        self.counts = FollowCounts()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow(name, h), name=f"kv-events-{name}") for name, h in self.handles.items()
        ]

    async def stop(self) -> None:
        self._stopping = True  # the flag, not only the cancellation, ends the loops (utils.end_loops says why)
        await end_loops(self._tasks)
        self._tasks = []

    async def _follow(self, name: str, handle: WorkerHandle) -> None:
        incarnation, after = "", -1
        while not self._stopping:
            try:
                page = await handle.kv_events(incarnation, after, self.poll_s)
            except DisaggError as exc:  # dead, restarting or stalled: the supervisor judges; poll again shortly
                self.counts.failures += 1
                log.debug("KV events of %s: %s", name, exc)
                await asyncio.sleep(self.retry_s)
                continue
            except Exception:  # a bug must not end the following of this worker: logged, counted, retried
                self.counts.failures += 1
                log.exception("following the KV events of %s failed unexpectedly", name)
                await asyncio.sleep(self.retry_s)
                continue
            self.counts.pages += 1
            if page.incarnation != incarnation:  # a new life of the worker: its numbering starts again
                incarnation, after = page.incarnation, -1
            for batch in page.batches:
                self.apply(batch)
                after = max(after, batch.seq_no)
            self.counts.batches += len(page.batches)
