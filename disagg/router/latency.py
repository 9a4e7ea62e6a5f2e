"""What the router keeps of finished requests (`LatencyWindow`: TTFT, TPOT and time in the system, for SLO
attainment and the planners; the placement's prediction errors) and the action that feeds it (`RecordLatency`,
which a request's Flight emits when it ends; both drivers carry it out through `apply_latency`).  Each outcome of
a prediction priced from a worker's own measurements also teaches that worker's TTFT correction
(router/correction.py).  Pure."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from disagg.router.correction import TtftCorrection
from disagg.stats import RouterCounters


@dataclass(frozen=True)
class RecordLatency:
    arrival: float
    first_token: float
    end: float
    tokens: int
    predicted_ttft_s: float | None = None  # the first attempt's prediction, timed from when it was routed
    routed_at: float | None = None
    priced_on: str = ""  # the worker that computed the prompt, its prediction from its own measurements ("": none)
    ttft_factor: float = 1.0  # that correction (the model's own prediction is predicted_ttft_s / ttft_factor)


@dataclass
class LatencyWindow:
    """TTFT and TPOT of recently finished requests (bounded), for SLO attainment over a time window."""

    max_samples: int = 4096
    samples: deque = field(default_factory=deque)  # (finished_at, ttft_s, tpot_s | None)
    # |predicted - actual| / actual TTFT (from routing) of recent first attempts whose decision predicted it
    prediction_errors: deque = field(default_factory=deque)
    correction: TtftCorrection | None = None  # where outcomes go to correct the next predictions (the policy's)

    def record_prediction(self, relative_error: float) -> None:
        self.prediction_errors.append(relative_error)
        while len(self.prediction_errors) > self.max_samples:
            self.prediction_errors.popleft()

    arrivals: deque = field(default_factory=deque)  # when requests reached the core (the fleet planner's rate)

    def arrived(self, now: float) -> None:
        self.arrivals.append(now)
        while len(self.arrivals) > self.max_samples:
            self.arrivals.popleft()

    def record(self, started: float, first_token: float, finished: float, num_tokens: int) -> None:
        tpot = (finished - first_token) / (num_tokens - 1) if num_tokens > 1 else None
        self.samples.append((finished, first_token - started, tpot, finished - started))
        while len(self.samples) > self.max_samples:
            self.samples.popleft()

    def expected_in_flight(self, rate_window_s: float, latency_window_s: float, now: float) -> float | None:
        """Little's law: requests per second arriving over the last `rate_window_s`, times the mean time in the
        system of those finished over the last `latency_window_s` - how many requests it holds at the rate it
        is sent now (None: nothing finished in that window to time)."""
        times = [s[3] for s in self.samples if s[0] >= now - latency_window_s]
        if not times:
            return None
        rate = sum(1 for t in self.arrivals if t >= now - rate_window_s) / rate_window_s
        return rate * sum(times) / len(times)

    def attainment(
        self, ttft_s: float, tpot_s: float, window_s: float, now: float | None = None
    ) -> tuple[float | None, float | None, int]:
        """(share of requests finished within the last `window_s` that met the TTFT SLO, the same for TPOT,
        how many finished); None when none finished."""
        now = time.monotonic() if now is None else now
        recent = [s for s in self.samples if s[0] >= now - window_s]
        if not recent:
            return None, None, 0
        tpots = [s[2] for s in recent if s[2] is not None]
        ttft_ok = sum(s[1] <= ttft_s for s in recent) / len(recent)
        tpot_ok = sum(t <= tpot_s for t in tpots) / len(tpots) if tpots else None
        return ttft_ok, tpot_ok, len(recent)


def apply_latency(latency: LatencyWindow, counters: RouterCounters, action: RecordLatency) -> None:
    """Carry out a RecordLatency action (both drivers): the SLO window, and the placement's prediction error."""
    latency.record(action.arrival, action.first_token, action.end, action.tokens)
    if action.predicted_ttft_s is not None and action.routed_at is not None:
        actual = action.first_token - action.routed_at
        if actual > 0:
            error = abs(action.predicted_ttft_s - actual) / actual
            counters.predicted(error)
            latency.record_prediction(error)
            if latency.correction is not None and action.priced_on:
                latency.correction.record(action.priced_on, action.predicted_ttft_s / action.ttft_factor, actual)
