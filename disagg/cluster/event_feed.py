"""A worker's KV event feed: the numbered batches it published lately, for every router that follows it.

Routers pull (router/event_follow.py), so any number of router replicas - and a router that Ray just restarted -
build the same prefix index from the same events, with no subscription for the worker to keep or to clean up
when a router dies.  A follower long-polls `since(incarnation, after_seq)`: it returns the batches after its
cursor at once, or waits up to `timeout_s` for the next one.  A follower that fell behind the window (or a
worker that restarted: a new incarnation numbers from 0 again) gets the window from its start; the sequence
numbers then show the gap and the router asks for a snapshot, as it does for any lost batch.

Pure asyncio (the worker's event loop); no Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from disagg.protocol import KVEventBatch, KVEventPage


class EventFeed:
    def __init__(self, incarnation: str, keep: int) -> None:
        if keep <= 0:
            raise ValueError("the feed keeps at least one batch")
        self.incarnation = incarnation
        self._batches: deque[KVEventBatch] = deque(maxlen=keep)
        self._new = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._batches)

    async def append(self, batch: KVEventBatch) -> None:
        """Keep a batch (the oldest falls out past `keep`) and wake the followers waiting for it."""
        self._batches.append(batch)
        async with self._new:
            self._new.notify_all()

    def _after(self, incarnation: str, after_seq: int) -> list[KVEventBatch]:
        if incarnation != self.incarnation:  # a follower of an earlier life of this worker: start over
            return list(self._batches)
        return [b for b in self._batches if b.seq_no > after_seq]

    async def since(self, incarnation: str, after_seq: int, timeout_s: float) -> KVEventPage:
        """The batches after `after_seq` (of `incarnation`); waits up to `timeout_s` when there are none yet."""
        batches = self._after(incarnation, after_seq)
        if not batches and timeout_s > 0:
            async with self._new:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self._new.wait_for(lambda: bool(self._after(incarnation, after_seq))), timeout_s
                    )
            batches = self._after(incarnation, after_seq)
        return KVEventPage(self.incarnation, batches)
