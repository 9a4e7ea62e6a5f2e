"""How far each worker's measured time to first token runs from what the placement model predicted: a correction
factor per worker, learned online from the outcomes and applied to that worker's next predictions.  Pure.

The placement model (router/placement.py) prices a prompt from the worker's own fitted step times, its queue and
its decodes.  What it does not see - workers sharing cores (steps slower than their fit when both run), the RPC and
the first token's way back, a queue the router's counts miss - makes a real worker's TTFT run above the prediction
by a share that is stable for that worker and its conditions.  Dynamo's planner answers the same gap with
correction factors (observed / expected TTFT and ITL, applied to its next predictions); here it is per worker, per
routing decision, and robust: of the worker's last `window` ratios of actual to raw (uncorrected) prediction, the
factor is the one that would have given them the least median relative error (the error the TTFT goal counts),
clamped to [`low`, `high`]; 1 until `min_samples` outcomes are in, and 1 while the model's own median error over
them is within `tolerance` (where it is right, a factor would only add the outcomes' noise).  Unlike a mean or a
plain median of the ratios, it is not pulled off by a tail: where most predictions are already right it stays at 1
and a few stalls do not move it; where a worker runs 30% slow throughout (two workers sharing two cores) it moves
to 1.3.  Only outcomes of predictions from the worker's own measurements teach it (the cold-start prior is another
model).  A worker that finishes nothing keeps its last factor, and one never seen is priced at 1: unknown is never
cheaper than the model.

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
    # a worker whose model's median error over the window is within this needs no correction (the TTFT goal's 20%):
    # where the model is right, a factor learned from a few dozen noisy outcomes would only add their noise
    tolerance: float = 0.2
    low: float = 0.5  # the factor's bounds: a few wild outcomes (a stall, a migration) must not swing pricing
    high: float = 4.0


class TtftCorrection:
    def __init__(self, config: CorrectionConfig | None = None) -> None:
        self.config = config or CorrectionConfig()
        self._ratios: dict[str, deque[float]] = {}
        self._factors: dict[str, float] = {}

    def factor(self, worker: str) -> float:
        return self._factors.get(worker, 1.0)

    def record(self, worker: str, raw_predicted_s: float, actual_s: float) -> None:
        """One outcome: the worker that computed the prompt, the model's raw prediction, the measured TTFT."""
        c = self.config
        if c.window <= 0 or raw_predicted_s <= 0 or actual_s <= 0:
            return
        ratios = self._ratios.setdefault(worker, deque(maxlen=c.window))
        ratios.append(actual_s / raw_predicted_s)
        if len(ratios) >= c.min_samples:
            wrong = statistics.median(abs(1.0 / r - 1.0) for r in ratios) > c.tolerance
            self._factors[worker] = min(c.high, max(c.low, best_factor(ratios))) if wrong else 1.0


def best_factor(ratios: Iterable[float]) -> float:
    """The factor f with the least median relative error |f / r - 1| over the ratios r (actual / predicted), among
    the ratios themselves and 1 (a least-median estimator, which up to half of them being wild does not move; the
    exact optimum may lie between two ratios, within their spread); of equal medians, the one nearest 1."""
    ratios = list(ratios)
    candidates = sorted({1.0, *ratios}, key=lambda f: abs(f - 1.0))
    return min(candidates, key=lambda f: statistics.median(abs(f / r - 1.0) for r in ratios))
