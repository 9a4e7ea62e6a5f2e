"""The CPU cores a simulated cluster's workers share, when they share a machine (SimClusterConfig.cores > 0).

While `busy` workers compute (itself included), a step runs slower than the calibrated engine alone on an idle
core by
    oversubscription  max(1, (busy workers x threads + serving cores) / cores, measured)
  x co-run            while another worker is busy too: the factor of the step's size class in `corun_by_tokens`
                      ((max tokens, factor) pairs), `corun_slowdown` beyond them (two engines on separate cores
                      still share memory bandwidth and caches, and a decode step, which reads every weight for a
                      few tokens, pays most)
where "measured" is the factor `busy_factors` gives that many busy workers (more engines than cores cost more
than the cores' share: context switches, evicted caches), and "serving cores" is a constant idle share plus the
CPU the router actor, its HTTP server, Ray and the client burn, as a rate over the last `window_s`:
`cpu_per_request_s` per request dispatched, `cpu_per_handoff_s` more per remote prefill handed to a decode
worker, and `cpu_per_token_s` per token streamed.  `SharedSteps` applies the factor as processor sharing: it is
recomputed whenever a step starts or ends, so a step pays the contention of its whole span, not of its start.
bench/sim/machine.py measures all of them on the machine, the co-run and busy factors inside a running cluster
(over each step's span too: bench/sim/steps.py).
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class CoresConfig:
    cores: int = 0  # 0: each worker has cores of its own, nothing is shared
    threads_per_worker: int = 1
    corun_slowdown: float = 1.0
    corun_by_tokens: tuple[tuple[int, float], ...] = ()  # (max step tokens, factor), by ascending size
    # measured: (other busy workers, factor over one other busy), ascending; a step pays at least the factor of
    # the largest count not above its own (more engines than cores cost more than the cores' share)
    busy_factors: tuple[tuple[int, float], ...] = ()
    cpu_per_request_s: float = 0.0
    cpu_per_token_s: float = 0.0
    cpu_per_handoff_s: float = 0.0
    idle_serving_cores: float = 0.0  # what the serving processes burn with no request at all (Ray's daemons)
    window_s: float = 1.0
    max_events: int = 100_000  # bound of the serving-CPU window


class SharedCores:
    def __init__(self, config: CoresConfig) -> None:
        self.config = config
        self._spent: deque[tuple[float, float]] = deque(maxlen=config.max_events)  # (time, CPU seconds)
        self._sum = 0.0

    def charge(self, now: float, cpu_s: float) -> None:
        if self.config.cores and cpu_s:
            if len(self._spent) == self._spent.maxlen:
                self._sum -= self._spent[0][1]
            self._spent.append((now, cpu_s))
            self._sum += cpu_s

    def on_request(self, now: float) -> None:
        self.charge(now, self.config.cpu_per_request_s)

    def on_handoff(self, now: float) -> None:
        self.charge(now, self.config.cpu_per_handoff_s)

    def on_tokens(self, now: float, n: int) -> None:
        self.charge(now, self.config.cpu_per_token_s * n)

    def serving_cores(self, now: float) -> float:
        while self._spent and self._spent[0][0] < now - self.config.window_s:
            self._sum -= self._spent.popleft()[1]
        if not self._spent:
            self._sum = 0.0  # no float residue once the window is empty
        return self.config.idle_serving_cores + max(0.0, self._sum) / self.config.window_s

    def corun(self, tokens: int) -> float:
        """The co-run factor of a step of `tokens` tokens."""
        return next((f for edge, f in self.config.corun_by_tokens if tokens <= edge), self.config.corun_slowdown)

    def slowdown(self, busy_workers: int, now: float, tokens: int = 0) -> float:
        """Factor on a step of `tokens` tokens that starts now while `busy_workers` workers (itself included) are
        computing."""
        cfg = self.config
        if not cfg.cores:
            return 1.0
        demand = busy_workers * cfg.threads_per_worker + self.serving_cores(now)
        if busy_workers <= 1:
            return max(1.0, demand / cfg.cores)
        measured = max((f for k, f in cfg.busy_factors if k <= busy_workers - 1), default=1.0)
        return max(1.0, demand / cfg.cores, measured) * self.corun(tokens)


@dataclass
class _Running:
    remaining_s: float  # the step's work left, in seconds of the engine alone on a core
    tokens: int
    started_at: float
    done: Callable[[float], None]  # called with the step's duration when its work is done
    rate: float = 0.0  # work seconds per second now: 1 / the step's slowdown
    generation: int = 0  # of its latest end event (unique across steps): an older one is dropped


class SharedSteps:
    """The steps of workers that share the cores, run as processor sharing: a step's work (its time alone) is
    done at a rate of 1 / `SharedCores.slowdown` for the workers computing *at each moment*, recomputed whenever
    a step starts or ends.  Fixing a step's duration when it starts would price a long prefill chunk that starts
    alone at 1x however many decode steps run beside it, and charge those decode steps the whole contention:
    real steps share the cores over their whole span (bench/sim/steps.py measures them that way too)."""

    def __init__(
        self, cores: SharedCores, now: Callable[[], float], at: Callable[[float, Callable[[], None]], None]
    ) -> None:
        self.cores, self._now, self._at = cores, now, at
        self._running: dict[object, _Running] = {}
        self._settled_at = 0.0
        # one counter for every end event: a step's stale event (rescheduled, cancelled) must not match the next
        # step of the same key, which a per-step counter restarting at 1 would
        self._generations = itertools.count(1)

    def __len__(self) -> int:
        return len(self._running)

    def start(self, key: object, work_s: float, tokens: int, done: Callable[[float], None]) -> None:
        """Run a step of `work_s` seconds alone for `key` (one step per key at a time)."""
        self._settle()
        self._running[key] = _Running(work_s, tokens, self._now(), done)
        self._reschedule()

    def cancel(self, key: object) -> None:
        """Drop `key`'s step unfinished (its process was killed): it no longer takes a core."""
        self._settle()
        if self._running.pop(key, None) is not None:
            self._reschedule()

    def _settle(self) -> None:
        now = self._now()
        for step in self._running.values():
            step.remaining_s = max(0.0, step.remaining_s - (now - self._settled_at) * step.rate)
        self._settled_at = now

    def _reschedule(self) -> None:
        now, busy = self._now(), len(self._running)
        for key, step in self._running.items():
            rate = 1.0 / self.cores.slowdown(busy, now, step.tokens)
            if rate != step.rate:  # an unchanged rate keeps its end event
                step.rate, step.generation = rate, next(self._generations)
                self._at(now + step.remaining_s / rate, functools.partial(self._end, key, step.generation))

    def _end(self, key: object, generation: int) -> None:
        step = self._running.get(key)
        if step is None or step.generation != generation:
            return
        self._settle()
        del self._running[key]
        step.done(self._now() - step.started_at)  # (may start the key's next step: one reschedule for both)
        self._reschedule()
