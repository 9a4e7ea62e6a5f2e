"""How far each worker's measured time to first token runs from what the placement model predicted: a correction
factor per worker, learned online from the outcomes and applied to that worker's next predictions.  Pure.

The placement model (router/placement.py) prices a prompt from the worker's own fitted step times, its queue and
its decodes.  What it does not see - workers sharing cores (steps slower than their fit when both run), the RPC
and the first token's way back, a queue the router's counts miss - makes a real worker's TTFT run above the
prediction by a share that is stable for that worker and its conditions.  Dynamo's planner answers the same gap
with correction factors (observed / expected TTFT and ITL, applied to its next predictions); here it is per
worker, per routing decision, and robust.  Of the worker's last `window` ratios of actual to raw (uncorrected)
prediction, the factor is the median of the largest cluster that one factor would have put within `tolerance`
(the error the TTFT goal counts: |f x predicted - actual| <= tolerance x actual; of equal clusters, the one
nearest 1), clamped to [`low`, `high`]; 1 until `min_samples` outcomes are in.  Unlike a mean or a plain median,
it is not pulled off by a tail: where most predictions are already right it stays at 1 and a few stalls do not
move it; where a worker runs 30% slow throughout (two workers sharing two cores) it moves to 1.3.  Only outcomes
of predictions from the worker's own measurements teach it (the cold-start prior is another model).  A worker
that finishes nothing keeps its last factor, and one never seen is priced at 1: unknown is never cheaper than the
model.

The raw prediction is what the factor learns from (not the corrected one), so the factor converges to the bias
itself instead of compounding on its own corrections.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class CorrectionConfig:
    window: int = 32  # outcomes per worker the factor learns from (0: no correction; PolicyConfig sets it)
    min_samples: int = 4  # outcomes before a worker's factor leaves 1
    tolerance: float = 0.2  # the relative error the factor maximises the share within (the TTFT goal's 20%)
    low: float = 0.5  # the factor's bounds: a few wild outcomes (a stall, a migration) must not swing pricing
    high: float = 4.0


class TtftCorrection:
    def __init__(self, config: CorrectionConfig | None = None) -> None:
        self.config = config or CorrectionConfig()
        self._ratios: dict[str, deque[float]] = {}
        self._factors: dict[str, float] = {}

    def factor(self, worker: str) -> float:
        return self._factors.get(worker, 1.0)

    def factors(self) -> dict[str, float]:
        """Every worker's factor that has left 1 (for /metrics)."""
        return dict(self._factors)

    def record(self, worker: str, raw_predicted_s: float, actual_s: float) -> None:
        """One outcome: the worker that computed the prompt, the model's raw prediction, the measured TTFT."""
        c = self.config
        if c.window <= 0 or raw_predicted_s <= 0 or actual_s <= 0:
            return
        ratios = self._ratios.setdefault(worker, deque(maxlen=c.window))
        ratios.append(actual_s / raw_predicted_s)
        if len(ratios) >= c.min_samples:
            self._factors[worker] = min(c.high, max(c.low, best_factor(ratios, c.tolerance)))


def best_factor(ratios: Iterable[float], tolerance: float) -> float:
    """The median of the largest cluster of ratios r (actual / predicted): those that one factor f puts within
    `tolerance` (|f / r - 1| <= tolerance, i.e. f in [r (1 - tolerance), r (1 + tolerance)]), f taken nearest 1
    among equally large clusters (a sweep over the intervals' ends)."""
    ratios = list(ratios)
    ends = sorted([(r * (1 - tolerance), 0) for r in ratios] + [(r * (1 + tolerance), 1) for r in ratios])
    best, count = 0, 0
    spans: list[list[float]] = []  # where `best` intervals overlap; the last one open until an end closes it
    for x, is_end in ends:  # at equal x, starts (0) sort before ends (1): touching intervals overlap
        if not is_end:
            count += 1
            if count > best:
                best, spans = count, [[x, x]]
            elif count == best:
                spans.append([x, x])
        else:
            if count == best and spans:
                spans[-1][1] = x
            count -= 1
    if not spans:
        return 1.0
    f = min((min(max(1.0, lo), hi) for lo, hi in spans), key=lambda f: abs(f - 1.0))
    return statistics.median(r for r in ratios if r * (1 - tolerance) <= f <= r * (1 + tolerance))
