"""The router's admission queue in front of a simulated cluster, in virtual time: the real AdmissionQueue (bands,
tenant fair share, deadlines, shedding) and the real RouterCore capacity checks (`has_room`); requests leave the
queue when a worker has room (`RouterCore.room_for`, with the same priority headroom), and are routed then among
the workers with room (`RouterCore.route_with_room`), exactly as `RouterCore.generate` does; with
`rescore_on_dispatch` off they are routed on arrival and wait for that worker.  Refused ones are reported the way
the HTTP API reports them (429)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from disagg.errors import Overloaded
from disagg.protocol import Request, TokenDelta
from disagg.router.admission import Entry
from disagg.router.decision import Decision


class SimAdmission:
    def __init__(self, cluster: Any, tick_s: float = 0.05) -> None:
        self.cluster = cluster
        self.router = cluster.router
        self.queue = self.router.admission.queue
        self.queue.clock = lambda: cluster.loop.now  # virtual time
        self.tick_s = tick_s
        self._pending: dict[str, tuple[Request, Callable, str | None, Decision | None, Entry]] = {}
        self._rejects: dict[str, Callable[[float, Overloaded], None]] = {}
        self._ticking = False

    def submit(
        self,
        request: Request,
        on_token: Callable[[float, TokenDelta], None],
        session: str | None,
        on_reject: Callable[[float, Overloaded], None],
        tenant: str = "default",
        priority: int = 0,
        deadline_s: float | None = None,
    ) -> None:
        now = self.cluster.loop.now
        cfg = self.queue.config
        limit = min(deadline_s or cfg.default_deadline_s, cfg.max_deadline_s)
        entry = Entry(request.request_id, tenant, priority, request.num_tokens, now, now + limit)
        decision = None
        if not self.router.config.rescore_on_dispatch:
            decision = self.router.route(request, session)
            entry.worker = decision.decode_worker
        try:
            shed = self.queue.submit(entry)
        except Overloaded as exc:
            on_reject(now, exc)
            return
        for victim in shed:
            self._reject(victim)
        self._pending[entry.request_id] = (request, on_token, session, decision, entry)
        self._rejects[entry.request_id] = on_reject
        self.pump()
        self._arm()

    def _reject(self, entry: Entry) -> None:
        self._pending.pop(entry.request_id, None)
        on_reject = self._rejects.pop(entry.request_id, None)
        if on_reject is not None and entry.rejection is not None:  # the queue sets it when it sheds or expires
            on_reject(self.cluster.loop.now, entry.rejection)

    def pump(self) -> None:
        while (entry := self.queue.pop_next(self.router.room_for)) is not None:
            request, on_token, session, decision, _ = self._pending.pop(entry.request_id)
            self._rejects.pop(entry.request_id, None)
            self.cluster.dispatch(
                request,
                on_token,
                session,
                decision=decision,
                priority=entry.priority,
                tenant=entry.tenant,
                arrival=entry.arrived,
            )

    def _arm(self) -> None:
        if not self._ticking and len(self.queue):
            self._ticking = True
            self.cluster.loop.at(self.cluster.loop.now + self.tick_s, self._tick)

    def _tick(self) -> None:
        self._ticking = False
        for entry in self.queue.expire():
            self._reject(entry)
        self.pump()
        self._arm()
