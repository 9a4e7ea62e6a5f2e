"""Chaos in the simulator: kill a fraction of the workers at a point in virtual time and measure goodput before,
during and after (the same detection and restart behaviour as the real router: out of routing after `detect_s`,
in-flight requests migrate resumed after their delivered tokens, the worker rejoins empty after `restart_s`).
The defaults are the figures `disagg bench chaos` measured on the real cluster (docs/benchmarks.md)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from bench.report import SLO, RequestRecord


@dataclass
class SimChaos:
    kill_fraction: float = 0.1
    at_s: float = 60.0  # virtual seconds after the first request
    detect_s: float = 1.3  # kill -> out of routing (measured: 1.28 s)
    restart_s: float = 8.5  # kill -> serving again (measured: 8.54 s)
    seed: int = 0

    def schedule(self, cluster: Any) -> list[str]:
        """Arm the kills on `cluster`; returns the victims' names."""
        names = sorted(w.name for w in cluster.workers)
        n = max(1, round(self.kill_fraction * len(names)))
        victims = random.Random(self.seed).sample(names, n)
        for name in victims:
            cluster.loop.at(self.at_s, lambda name=name: cluster.kill_worker(name, self.detect_s, self.restart_s))
        return victims


def window_goodput(records: list[RequestRecord], chaos: SimChaos, slo: SLO, end_s: float) -> dict[str, Any]:
    """Goodput (requests/s meeting the SLO) of requests that started before, during and after the outage."""
    bounds = {"before": (0.0, chaos.at_s), "during": (chaos.at_s, chaos.at_s + chaos.restart_s),
              "after": (chaos.at_s + chaos.restart_s, end_s)}
    out = {}
    for name, (lo, hi) in bounds.items():
        picked = [r for r in records if lo <= r.start_s < hi]
        good = sum(slo.met(r) for r in picked)
        span = max(hi - lo, 1e-9)
        out[name] = {"window_s": span, "requests": len(picked), "failed": sum(not r.ok for r in picked),
                     "goodput": good / span, "slo_met": good / len(picked) if picked else float("nan")}
    return out
