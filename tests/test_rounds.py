"""The planners' rounds (planner/rounds.py): a failed round is survived, a run of them ends the task loudly."""

from __future__ import annotations

import asyncio

import pytest

from disagg.planner.rounds import Rounds


async def _until(cond, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def test_a_failed_round_is_survived_and_the_count_resets() -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(1)
        if len(calls) % 2:  # every other round fails: never 3 in a row
            raise RuntimeError("transient")

    async def main() -> None:
        rounds = Rounds("test", step, interval_s=0.001, max_failures=3)
        rounds.start()
        await _until(lambda: len(calls) >= 20)
        assert rounds.running and not rounds.gave_up
        await rounds.stop()
        assert not rounds.running

    asyncio.run(main())


def test_a_run_of_failed_rounds_ends_the_task_loudly(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(1)
        raise RuntimeError("broken port")

    async def main() -> None:
        rounds = Rounds("test planner", step, interval_s=0.001, max_failures=4)
        rounds.start()
        await _until(lambda: rounds.gave_up)
        await _until(lambda: not rounds.running)
        assert len(calls) == 4
        await rounds.stop()

    asyncio.run(main())
    assert "test planner stopped after 4 failed rounds" in caplog.text


def test_stop_before_start_and_twice_is_harmless() -> None:
    async def step() -> None:
        return None

    async def main() -> None:
        rounds = Rounds("test", step, interval_s=10.0)
        await rounds.stop()
        rounds.start()
        rounds.start()  # a second start keeps the one task
        assert rounds.running
        await rounds.stop()
        await rounds.stop()
        assert not rounds.running

    asyncio.run(main())
