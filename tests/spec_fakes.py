"""Step times for speculation tests: a table the engine's measurements never move (engine/spec_budget.py)."""

from collections.abc import Callable

from disagg.engine.spec_budget import DecodeStepTimes


class FixedStepTimes(DecodeStepTimes):
    """t(R) = cost(R) for every row count from 1 to 256; the engine's measured steps are ignored."""

    def __init__(self, cost: Callable[[int], float]) -> None:
        super().__init__(alpha=0.0)
        for rows in range(1, 257):
            super().add(rows, cost(rows))

    def add(self, rows: int, seconds: float) -> None:
        pass


def rows_free() -> FixedStepTimes:
    """Step times that do not grow with the rows: the budget keeps every proposal."""
    return FixedStepTimes(lambda rows: 0.01)
