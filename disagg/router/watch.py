"""Silent failures, watched: the shell around the canary verdicts (router/canary.py) and the gray-failure detector
(router/outliers.py), on the router's event loop beside the health supervisor.

Every `check_interval_s`:
  - canaries: each READY or DRAINED worker whose canary is due (idle: `idle_interval_s`, under load:
    `busy_interval_s`) gets the fixed prompt, greedy, straight through its handle: not through the admission
    queue, the flight or the load book, so canaries count in no user metric (no decision, no latency, no
    tenant charge, no path count).  A FAIL condemns the worker: out of routing (its streams migrate) and killed,
    so its supervisor's restart brings a fresh process;
  - outliers: the heartbeats' latest figures of the READY and DRAINED workers go to the detector; its changes
    drain a worker or bring it back.
Both are reported through the health monitor's event log (`recent_events`, the admin API) and the log.

NaN/Inf logits and impossible token ids need no watch: the worker fails the request itself (`OutputCorrupt`,
which migrates it) and reports itself unhealthy in its heartbeat (router/health.py kills it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from disagg.errors import DisaggError
from disagg.protocol import Request, Role, SamplingParams
from disagg.router.canary import CanaryBook, CanaryConfig, Verdict, canary_due
from disagg.router.handles import WorkerHandle
from disagg.router.health import Action, HealthMonitor
from disagg.router.outliers import OutlierConfig, OutlierDetector, Sample
from disagg.router.ranking import WorkerLoad

log = logging.getLogger(__name__)


@dataclass
class SilentConfig:
    """Catching workers that answer wrong or slowly (both off by default)."""

    canary: CanaryConfig = field(default_factory=CanaryConfig)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    check_interval_s: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.canary.enabled or self.outliers.enabled


@dataclass
class WatchCounts:
    canaries: int = 0  # canary answers judged
    canary_failures: int = 0  # workers condemned
    drains: int = 0  # outliers drained
    undrains: int = 0


class SilentFailureWatch:
    def __init__(
        self,
        config: SilentConfig,
        monitor: HealthMonitor,
        handles: Mapping[str, WorkerHandle],
        busy: Callable[[str], bool],
        enforce: Callable[[str, Action], Awaitable[None]],
        loads: Mapping[str, WorkerLoad] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self.monitor, self.handles = config, monitor, handles
        self._loads = loads or {}  # a prefill worker serving whole requests (flexible) is compared with decoders
        self._busy, self._enforce, self.clock = busy, enforce, clock
        self.book = CanaryBook(len(handles), config.canary)
        self.detector = OutlierDetector(config.outliers)
        self.counts = WatchCounts()
        self._last: dict[str, float] = {}  # when each worker's last canary started
        self._incarnations: dict[str, str | None] = {}
        self._inflight: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._sent = 0

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._task, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task, self._inflight = None, {}

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the watch
                log.exception("silent-failure check failed unexpectedly")
            await asyncio.sleep(self.config.check_interval_s)

    async def check(self) -> None:
        """One round: forget restarted workers, start the canaries due, judge the outliers."""
        for name, w in self.monitor.workers.items():
            if self._incarnations.get(name) != w.incarnation or not self.monitor.watched(name):
                self._incarnations[name] = w.incarnation
                self.book.forget(name)
                self.detector.forget(name)
                self._last.pop(name, None)
        if self.config.canary.enabled:
            self._start_canaries()
        if self.config.outliers.enabled:
            self._check_outliers()

    def _start_canaries(self) -> None:
        now = self.clock()
        for name in self.monitor.workers:
            if not self.monitor.watched(name) or name in self._inflight:
                continue
            if canary_due(self._last.get(name), now, self._busy(name), self.config.canary):
                self._last[name] = now
                task = asyncio.get_running_loop().create_task(self.canary(name))
                self._inflight[name] = task
                task.add_done_callback(self._settled(name))

    def _settled(self, name: str) -> Callable[[asyncio.Task], None]:
        def settled(_task: asyncio.Task) -> None:
            self._inflight.pop(name, None)

        return settled

    async def canary(self, name: str) -> Verdict | None:
        """Run one canary on `name` and act on the verdicts it settles (None: no complete answer)."""
        c = self.config.canary
        incarnation = self.monitor.workers[name].incarnation
        self._sent += 1
        request = Request(
            f"canary-{name}-{self._sent}",
            list(c.prompt),
            SamplingParams(max_tokens=c.max_tokens, temperature=0, ignore_eos=True),
        )
        try:
            answer = await asyncio.wait_for(self._answer(name, request), c.timeout_s)
        except (DisaggError, asyncio.TimeoutError) as exc:  # dead or hung: the heartbeats' business
            log.info("canary on %s got no answer: %s", name, exc)
            return None
        if self.monitor.workers[name].incarnation != incarnation:
            return None  # restarted meanwhile: the answer is the old process's
        self.counts.canaries += 1
        verdicts = self.book.record(name, answer)
        for worker, verdict in verdicts.items():
            if verdict is Verdict.FAIL:
                await self._condemn(worker, answer if worker == name else None)
        return verdicts[name]

    async def _answer(self, name: str, request: Request) -> list[int]:
        tokens: list[int] = []
        stream = self.handles[name].generate(request, None)
        try:
            async for delta in stream:
                tokens += delta.token_ids
        finally:
            await stream.aclose()
        return tokens

    async def _condemn(self, name: str, answer: list[int] | None) -> None:
        reference = list(self.book.reference or ())
        reason = f"wrong canary answer {answer or list(self.book.answers.get(name, ()))} (reference {reference})"
        action = self.monitor.condemn(name, reason)
        if action is Action.KILL:
            self.counts.canary_failures += 1
            self.book.forget(name)
            await self._enforce(name, action)

    def _check_outliers(self) -> None:
        samples = []
        for name, w in self.monitor.workers.items():
            stats = w.stats
            if self.monitor.watched(name) and stats is not None:
                decodes = name in self._loads and self._loads[name].decoding > 0
                role = Role.DECODE if w.role is Role.PREFILL and decodes else w.role
                samples.append(Sample(name, role, stats.step_s_per_token, stats.running))
        for change in self.detector.check(samples):
            if change.drain and self.monitor.drain(change.worker, change.reason):
                self.counts.drains += 1
            elif not change.drain and self.monitor.undrain(change.worker, change.reason):
                self.counts.undrains += 1
