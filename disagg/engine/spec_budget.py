"""How many proposed tokens a decode step verifies: the batch-wide budget that maximizes the expected tokens per
second, from this engine's own measured step times (the rule of SmartSpec, "Optimizing Speculative Decoding for
Serving Large Language Models Using Goodput", arXiv 2406.14066, proposed for vLLM in its RFC "Automate
Speculative Decoding"): an acceptance rate alone cannot tell batch 1, where a proposal is nearly free, from a
wide batch, where the same acceptance loses.

A decode step that runs R rows (each running sequence's last token plus the proposals verified beside it) takes
t(R) and emits one token per sequence plus the accepted proposals.  The j-th token of a sequence's proposal is
accepted with chance P_j = c_1 ... c_j (spec.py keeps each sequence's per-position rates c).  Taking proposed tokens
in falling order of P_j, the plan evaluates the expected rate (B + sum of the P taken) / t(B + m) for every m and
keeps the best m (the fewest rows on ties).  A proposal pays where rows are cheap beside the step (batch 1 on a
bandwidth-bound machine, long copy-like outputs) and is cut where a row costs about what a plain token does (wide
batches, chat text that rarely repeats): one rule, no per-workload switch.

Why the engine's own table and not the fitted step model (step_time.py): the cost of a few more rows depends on
the kernels (a row kernel below some width, a blocked GEMM above it), which a line through prefill chunks and
decode steps does not show.  `DecodeStepTimes` keeps an EWMA of the measured time for every row count seen in
decode-only steps, interpolated between them, extrapolated along the last two above them (and in proportion to
the rows below them).  Until two row
counts are known the plan is cold, and a token is proposed while its chance is at least the configured floor.
"""

from __future__ import annotations

import bisect
import heapq


class DecodeStepTimes:
    """Measured seconds of decode-only steps by their rows (an EWMA per row count)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self._rows: list[int] = []  # sorted row counts measured
        self._seconds: dict[int, float] = {}
        self._samples: dict[int, int] = {}

    def add(self, rows: int, seconds: float) -> None:
        if seconds <= 0:  # a clock that did not move says nothing
            return
        n = self._samples.get(rows, 0)
        self._samples[rows] = n + 1
        if n == 0:
            bisect.insort(self._rows, rows)
        # a row count's first step pays one-time costs (a new shape's buffers: 18x the next one in a run here), so
        # the second sample replaces it; from then on an EWMA
        self._seconds[rows] = seconds if n <= 1 else (1 - self.alpha) * self._seconds[rows] + self.alpha * seconds

    @property
    def warm(self) -> bool:
        return len(self._rows) >= 2

    def predict(self, rows: int) -> float:
        """t(rows): measured, interpolated between the nearest measured counts, extrapolated along the last two
        beyond them (never below the widest measured time), or below the narrowest in proportion to the rows (a
        step's time shrinks no faster than its rows).  Needs `warm`; positive for rows >= 1."""
        if rows in self._seconds:
            return self._seconds[rows]
        i = bisect.bisect_left(self._rows, rows)
        if i == 0:
            return self._seconds[self._rows[0]] * rows / self._rows[0]
        lo, hi = (i - 1, i) if i < len(self._rows) else (i - 2, i - 1)
        r0, r1 = self._rows[lo], self._rows[hi]
        t0, t1 = self._seconds[r0], self._seconds[r1]
        t = t0 + (t1 - t0) * (rows - r0) / (r1 - r0)
        return max(t, t1) if rows > r1 else t


def chances(rates: list[float]) -> list[float]:
    """P_j for j = 1..len(rates): the chance the j-th proposed token is accepted (the rates are conditional)."""
    out, p = [], 1.0
    for c in rates:
        p *= c
        out.append(p)
    return out


def plan_lengths(cands: list[list[float]], rows: int, times: DecodeStepTimes, floor: float) -> list[int]:
    """How many tokens of each candidate proposal to verify.  `cands[i]` are the chances P_1.. of proposal i
    (non-increasing); `rows` is the step's rows without proposals."""
    if not times.warm:
        return [sum(1 for p in c if p >= floor) for c in cands]
    gain = float(rows)
    best, best_rate = 0, gain / times.predict(rows)
    # every proposed token, most likely first; (-P, j) keeps each proposal's tokens in order
    heap = [(-c[0], 0, i) for i, c in enumerate(cands) if c]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        neg, j, i = heapq.heappop(heap)
        order.append(i)
        gain -= neg
        rate = gain / times.predict(rows + len(order))
        if rate > best_rate:
            best, best_rate = len(order), rate
        if j + 1 < len(cands[i]):
            heapq.heappush(heap, (-cands[i][j + 1], j + 1, i))
    keep = [0] * len(cands)
    for i in order[:best]:
        keep[i] += 1
    return keep
