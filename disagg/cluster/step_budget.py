"""How long a worker's step loop keeps trying: its failed engine steps in a row, the backoff after each, and the
budget past which it gives up.

A worker whose steps keep failing is normally taken out by the router (its heartbeats report the failures, and
the health monitor kills it past `HealthConfig.max_step_failures` so that Ray restarts it).  The budget is the
worker's own bound for when that does not happen (no supervisor, a kill that did not land): past it the loop
stops for good, every request waiting on it fails with `WorkerLost` (the router migrates it, or falls back to a
local prefill), new requests are refused with the same error, and heartbeats report the worker unhealthy.
"""

from __future__ import annotations

import logging

from disagg.errors import WorkerLost

log = logging.getLogger(__name__)


class StepBudget:
    def __init__(self, worker: str, budget: int, backoff_s: float, max_backoff_failures: int) -> None:
        if budget < 1:
            raise ValueError("step_failure_budget must be >= 1")
        self.worker, self.budget = worker, budget
        self.backoff_s, self.max_backoff_failures = backoff_s, max_backoff_failures
        self.failures = 0  # consecutive failed steps
        self.gave_up: str | None = None  # why the loop stopped for good

    @property
    def healthy(self) -> bool:
        return self.gave_up is None

    def ok(self) -> None:
        self.failures = 0

    def failed(self, exc: Exception) -> float | None:
        """A step failed: the seconds to wait before the next one, or None when the budget is spent (given up)."""
        self.failures += 1
        log.error("engine step failed (%d in a row)", self.failures, exc_info=exc)
        if self.failures > self.budget:
            self.gave_up = f"{self.failures} engine steps failed in a row (last: {type(exc).__name__}: {exc})"
            log.error("%s gives up: %s", self.worker, self.gave_up)
            return None
        return self.backoff_s * min(self.failures, self.max_backoff_failures)

    def check(self) -> None:
        """Refuse a new request once the worker has given up."""
        if self.gave_up is not None:
            raise self.lost()

    def lost(self) -> WorkerLost:
        """The error a request waiting on a worker that gave up fails with (a fresh one per request)."""
        return WorkerLost(f"{self.worker}: {self.gave_up}", worker=self.worker, code="step_failures")
