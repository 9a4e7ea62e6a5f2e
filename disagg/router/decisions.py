"""The routing core's recent decisions (which workers each request went to, and why), kept for tests, `/health`
tooling and the chaos bench's observer (the router actor's `decisions`).

Each is kept as a plain tuple of plain values (read back as `Routed`), not the Decision itself: Python's
collector stops tracking an exact tuple of plain values (a named tuple it keeps tracking), while a kept Decision
(with its costs dict and TierMatch) is four objects every full collection walks - tens of thousands for a log of
10,000, a pause of milliseconds in the routing loop (docs/benchmarks.md, "Decision latency at scale")."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, NamedTuple

from disagg.router.decision import Decision


class Routed(NamedTuple):
    """What the log keeps of one decision."""

    request_id: str
    decode_worker: str
    prefill_worker: str | None
    overlap_blocks: int
    reason: str
    peer_worker: str | None
    device_blocks: int
    cpu_blocks: int
    disk_blocks: int


class DecisionLog:
    def __init__(self, maxlen: int, lock: threading.Lock) -> None:
        """`lock`: the core's (`append` is called with it held, by RouterCore.route)."""
        self._items: deque[tuple] = deque(maxlen=maxlen)  # each a Routed's fields
        self._lock = lock

    def append(self, request_id: str, decision: Decision) -> None:
        d, m = decision, decision.match  # a Routed's fields, as a plain tuple (see the module docstring)
        self._items.append(
            (request_id, d.decode_worker, d.prefill_worker, d.overlap_blocks, d.reason, d.peer_worker, m.device,
             m.cpu, m.disk)
        )  # fmt: skip

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def of(self, request_id: str) -> Routed | None:
        with self._lock:
            for routed in reversed(self._items):  # recent requests sit at the end
                if routed[0] == request_id:
                    return Routed._make(routed)
        return None

    def recent(self, n: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            items = [Routed._make(r) for r in list(self._items)[-n:]]
        return [
            {
                "request_id": r.request_id,
                "decode": r.decode_worker,
                "prefill": r.prefill_worker,
                "overlap_blocks": r.overlap_blocks,
                "reason": r.reason,
                "peer": r.peer_worker,
                "device_blocks": r.device_blocks,
                "cpu_blocks": r.cpu_blocks,
                "disk_blocks": r.disk_blocks,
            }
            for r in items
        ]
