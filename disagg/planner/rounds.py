"""Rounds on an interval with a failure budget: the task both planners' loops run (planner/loop.py for roles,
planner/fleet_loop.py for models), and how both count a round without a move (`count_hold`).

Lifecycle: `start()` (on the running event loop) runs `step` every `interval_s` as one task; `stop()` cancels it
and waits for it.  A round that raises is logged and the next one runs - one bad round must not end planning - but
`max_failures` rounds in a row end the task, loudly: a planner that can never act says so instead of spinning.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

H = TypeVar("H", bound=enum.Enum)


class Holding(Protocol[H]):
    """A planner that remembers why it last made no move (planner/policy.py's Planner, planner/fleet.py's)."""

    last_hold: H | None


def count_hold(name: str, holds: Counter[H], planner: Holding[H], hold: H) -> H:
    """A round without a move: counted by reason, and logged when the reason changes (not every round)."""
    holds[hold] += 1
    if hold is not planner.last_hold:
        log.info("%s: hold (%s)", name, hold.value)
        planner.last_hold = hold
    return hold


class Rounds:
    def __init__(
        self, name: str, step: Callable[[], Awaitable[object]], interval_s: float, max_failures: int = 20
    ) -> None:
        self.name = name  # "planner", "fleet planner": what the logs call it
        self.step = step
        self.interval_s = interval_s
        self.max_failures = max_failures  # consecutive failed rounds before the task stops trying
        self.gave_up = False  # True once max_failures rounds in a row failed
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.step()
                failures = 0
            except Exception:  # the budget below bounds what is swallowed, and each is logged
                failures += 1
                log.exception("%s round failed (%d in a row)", self.name, failures)
                if failures >= self.max_failures:
                    log.error("%s stopped after %d failed rounds", self.name, failures)
                    self.gave_up = True
                    return
