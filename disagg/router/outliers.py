"""Gray failures (pure: no I/O, no clock): a worker that answers, but much more slowly than its peers.

A worker on a throttled CPU, a failing disk or a noisy neighbour keeps passing heartbeats and canaries while every
request routed to it is slow.  Each check compares each worker's step time per token (`WorkerStats.
step_s_per_token`, an EWMA the engine keeps over its model steps) with the median of its peers: the workers of the
same role at a similar load (running requests within `load_ratio` x + `load_slack` of each other: per-token step
time falls as the batch grows, so a busy worker and an idle one are not compared) that are not drained themselves.
A worker slower than `ratio` x that median for `bad_checks` checks in a row is drained (no new requests; its
streams finish); it comes back after `good_checks` checks in a row within the ratio.  The hysteresis keeps noise
from flapping a worker in and out.  A drained worker keeps being measured: the canaries still run on it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from disagg.protocol import Role


@dataclass
class OutlierConfig:
    enabled: bool = field(
        default=False,
        metadata={"flag": "--gray-failures", "help": "drain a worker much slower than its peers (same role and load)"},
    )
    ratio: float = field(  # slower than this many times its peers' median: an outlier
        default=3.0, metadata={"help": "a worker this many times slower per token than its peers' median is drained"}
    )
    bad_checks: int = 3  # outlier checks in a row before it is drained
    good_checks: int = 5  # normal checks in a row before a drained worker comes back
    load_ratio: float = 2.0  # peers at a similar load: running counts within load_ratio x + load_slack
    load_slack: int = 4

    def __post_init__(self) -> None:
        if self.ratio <= 1.0 or self.bad_checks < 1 or self.good_checks < 1:
            raise ValueError("outliers: ratio > 1, bad_checks >= 1, good_checks >= 1")


@dataclass(frozen=True)
class Sample:
    """One worker's figures at a check (None: not measured yet)."""

    worker: str
    role: Role
    step_s_per_token: float | None
    running: int


@dataclass(frozen=True)
class Change:
    worker: str
    drain: bool  # True: drain it; False: it comes back
    reason: str


class OutlierDetector:
    def __init__(self, config: OutlierConfig) -> None:
        self.config = config
        self.drained: set[str] = set()
        self.bad: dict[str, int] = {}  # outlier checks in a row
        self.good: dict[str, int] = {}  # normal checks in a row (counted while drained)

    def forget(self, worker: str) -> None:
        """The worker left (dead, restarting): its next incarnation starts with a clean record."""
        self.drained.discard(worker)
        self.bad.pop(worker, None)
        self.good.pop(worker, None)

    def check(self, samples: list[Sample]) -> list[Change]:
        changes = []
        for s in samples:
            ratio = self._ratio(s, samples)
            if ratio is None:  # nothing to compare with: the streaks stand
                continue
            if ratio > self.config.ratio:
                self.bad[s.worker], self.good[s.worker] = self.bad.get(s.worker, 0) + 1, 0
                if s.worker not in self.drained and self.bad[s.worker] >= self.config.bad_checks:
                    self.drained.add(s.worker)
                    reason = f"step time per token {ratio:.1f}x its peers' for {self.bad[s.worker]} checks"
                    changes.append(Change(s.worker, True, reason))
            else:
                self.good[s.worker], self.bad[s.worker] = self.good.get(s.worker, 0) + 1, 0
                if s.worker in self.drained and self.good[s.worker] >= self.config.good_checks:
                    self.drained.discard(s.worker)
                    changes.append(Change(s.worker, False, f"back within {self.config.ratio}x of its peers"))
        return changes

    def _ratio(self, s: Sample, samples: list[Sample]) -> float | None:
        """This worker's step time per token over its peers' median (None: no measurement, or no peer)."""
        if s.step_s_per_token is None:
            return None
        peers = [
            p.step_s_per_token
            for p in samples
            if p.worker != s.worker
            and p.role is s.role
            and p.worker not in self.drained
            and p.step_s_per_token
            and self._similar(p.running, s.running)
        ]
        if not peers:
            return None
        return s.step_s_per_token / statistics.median(peers)

    def _similar(self, a: int, b: int) -> bool:
        lo, hi = min(a, b), max(a, b)
        return hi <= self.config.load_ratio * lo + self.config.load_slack
