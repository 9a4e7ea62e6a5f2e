"""Canary verdicts (pure: no I/O, no clock of its own): is a worker's greedy answer to a fixed prompt right?

A worker can answer fast and wrong (corrupted weights, a bad kernel on one CPU type) with nothing in its heartbeat
to show it.  Every worker answers the same fixed prompt greedily (router/watch.py sends it: when the worker is idle,
and at a low rate under load); this module judges the answers.

Where the right answer comes from: the workers themselves, by majority.  A worker cannot compute its own
reference at start-up (a corrupted worker would bake in its corrupted answer), and an answer shipped with the
model ties the check to one model build, dtype and kernel set (bfloat16 on a GPU and float32 on a CPU may pick
different greedy tokens, both healthy).  So the reference is the first answer that a strict majority of the
cluster's workers (and at least `min_agreeing` of them) gave: one bad worker, or a minority, cannot set it, and it
is the answer of this model on this hardware.  Until a reference exists every answer is PENDING; the answer that
establishes it settles the earlier ones.  A worker is condemned after `fail_after` wrong answers in a row, so a
greedy near-tie flipped by batching noise under load does not restart a healthy worker.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


def _default_prompt() -> list[int]:
    return list(range(1, 33))  # token ids valid in any vocabulary of 33 or more; two full blocks of 16


@dataclass
class CanaryConfig:
    enabled: bool = field(
        default=False,
        metadata={
            "flag": "--canary",
            "help": "probe each worker with a fixed greedy prompt; a wrong answer restarts it",
        },
    )
    idle_interval_s: float = field(default=2.0, metadata={"help": "canary interval of an idle worker, seconds"})
    busy_interval_s: float = field(  # a low rate under load: the canary takes a slot in the worker's batch
        default=30.0, metadata={"help": "canary interval of a worker serving requests, seconds"}
    )
    prompt: list[int] = field(default_factory=_default_prompt)
    max_tokens: int = 8
    timeout_s: float = 10.0  # no complete answer by then: no verdict (liveness is the heartbeat's business)
    min_agreeing: int = 2  # the reference needs at least this many agreeing workers (and a strict majority)
    fail_after: int = 2  # wrong answers in a row before the worker is condemned

    def __post_init__(self) -> None:
        if self.min_agreeing < 2 or self.fail_after < 1 or self.max_tokens < 1 or not self.prompt:
            raise ValueError("canary: min_agreeing >= 2, fail_after >= 1, max_tokens >= 1, a non-empty prompt")


def canary_due(last_at: float | None, now: float, busy: bool, config: CanaryConfig) -> bool:
    """Whether a worker's next canary is due (never probed: at once)."""
    if last_at is None:
        return True
    return now - last_at >= (config.busy_interval_s if busy else config.idle_interval_s)


class Verdict(str, enum.Enum):
    PENDING = "pending"  # no reference yet
    PASS = "pass"
    WRONG = "wrong"  # differs from the reference, not yet fail_after times in a row
    FAIL = "fail"  # condemned: out of routing and restarted


class CanaryBook:
    """The reference answer and each worker's standing against it."""

    def __init__(self, num_workers: int, config: CanaryConfig) -> None:
        self.num_workers, self.config = num_workers, config
        self.reference: tuple[int, ...] | None = None
        self.answers: dict[str, tuple[int, ...]] = {}  # each worker's latest answer
        self.wrong: dict[str, int] = {}  # wrong answers in a row

    def record(self, worker: str, answer: list[int]) -> dict[str, Verdict]:
        """Take a worker's answer; the verdicts it decides: this worker's, and when it establishes the reference,
        every worker's that answered before."""
        self.answers[worker] = tuple(answer)
        if self.reference is None:
            self.reference = self._majority()
            if self.reference is None:
                return {worker: Verdict.PENDING}
            return {name: self._judge(name) for name in self.answers}
        return {worker: self._judge(worker)}

    def forget(self, worker: str) -> None:
        """A new incarnation starts with a clean record (the reference stays)."""
        self.answers.pop(worker, None)
        self.wrong.pop(worker, None)

    def _judge(self, worker: str) -> Verdict:
        if self.answers[worker] == self.reference:
            self.wrong[worker] = 0
            return Verdict.PASS
        self.wrong[worker] = self.wrong.get(worker, 0) + 1
        return Verdict.FAIL if self.wrong[worker] >= self.config.fail_after else Verdict.WRONG

    def _majority(self) -> tuple[int, ...] | None:
        counts: dict[tuple[int, ...], int] = {}
        for answer in self.answers.values():
            counts[answer] = counts.get(answer, 0) + 1
        for answer, n in counts.items():
            if n >= self.config.min_agreeing and 2 * n > self.num_workers:
                return answer
        return None
