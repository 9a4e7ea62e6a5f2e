"""Chaos in the simulator: kill a fraction of the workers at a point in virtual time and measure goodput before,
during and after (the same detection and restart behaviour as the real router: out of routing after `detect_s`,
in-flight requests migrate resumed after their delivered tokens, the worker rejoins empty after `restart_s`).
The defaults are the figures `disagg bench chaos` measured on the real cluster (docs/benchmarks.md, SIGKILL rows);
`SimChaos.measured(result.json)` takes them from a chaos run's result file instead (median over the SIGKILL
injections), which is what `disagg.sim.run --chaos-result` does."""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagg.workload.metrics import SLO, RequestRecord


@dataclass
class SimChaos:
    kill_fraction: float = 0.1
    at_s: float = 60.0  # virtual seconds after the first request
    # kill -> out of routing: the real SIGKILL rows, 1.35 s (decode) and 1.33 s (prefill)
    detect_s: float = 1.34
    # kill -> serving again: the real SIGKILL rows, 13.2 s (decode) and 14.5 s (prefill); those were READY
    # events - `measured()` reads the first-request figure of a newer chaos run
    restart_s: float = 13.85
    seed: int = 0

    @classmethod
    def measured(cls, result_path: str | Path, **kwargs: Any) -> SimChaos:
        """Detection and restart times from a `disagg bench chaos` result: medians over its SIGKILL injections."""
        rows = json.loads(Path(result_path).read_text())["faults"]
        kills = [r for r in rows if r["fault"] in ("kill-decode", "kill-prefill")]

        def median(key: str) -> float:
            values = [r[key] for r in kills if r.get(key) is not None]
            if not values:
                raise ValueError(f"{result_path}: no SIGKILL injection measured {key}")
            return statistics.median(values)

        return cls(detect_s=median("out_of_routing_s"), restart_s=median("serving_again_s"), **kwargs)

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
    bounds = {
        "before": (0.0, chaos.at_s),
        "during": (chaos.at_s, chaos.at_s + chaos.restart_s),
        "after": (chaos.at_s + chaos.restart_s, end_s),
    }
    out = {}
    for name, (lo, hi) in bounds.items():
        picked = [r for r in records if lo <= r.start_s < hi]
        good = sum(slo.met(r) for r in picked)
        span = max(hi - lo, 1e-9)
        out[name] = {
            "window_s": span,
            "requests": len(picked),
            "failed": sum(not r.ok for r in picked),
            "goodput": good / span,
            "slo_met": good / len(picked) if picked else float("nan"),
        }
    return out
