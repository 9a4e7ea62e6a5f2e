"""The routing core's recent decisions (which workers each request went to, and why), kept for tests, `/health`
tooling and the chaos bench's observer (the router actor's `decisions`)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from disagg.router.decision import Decision


@dataclass
class RoutedRequest:
    request_id: str
    decision: Decision


class DecisionLog:
    def __init__(self, maxlen: int, lock: threading.Lock) -> None:
        """`lock`: the core's (`append` is called with it held, by RouterCore.route)."""
        self._items: deque[RoutedRequest] = deque(maxlen=maxlen)
        self._lock = lock

    def append(self, request_id: str, decision: Decision) -> None:
        self._items.append(RoutedRequest(request_id, decision))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def of(self, request_id: str) -> Decision | None:
        with self._lock:
            for routed in reversed(self._items):  # recent requests sit at the end
                if routed.request_id == request_id:
                    return routed.decision
        return None

    def recent(self, n: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._items)[-n:]
        return [
            {
                "request_id": r.request_id,
                "decode": r.decision.decode_worker,
                "prefill": r.decision.prefill_worker,
                "overlap_blocks": r.decision.overlap_blocks,
                "reason": r.decision.reason,
                "peer": r.decision.peer_worker,
                "device_blocks": r.decision.match.device,
                "cpu_blocks": r.decision.match.cpu,
                "disk_blocks": r.decision.match.disk,
            }
            for r in items
        ]
