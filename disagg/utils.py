"""Small rules shared across the runtime, so each has one definition."""

from __future__ import annotations

import asyncio
from typing import Protocol


class Background(Protocol):
    """A part that runs tasks on the event loop: started there, and stopped (restartable)."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


def cdiv(a: int, b: int) -> int:
    """Ceiling division of integers (blocks holding `a` tokens at `b` per block), exact for any size (no floats)."""
    return -(-a // b)


async def end_loops(tasks: list[asyncio.Task]) -> None:
    """Cancel background loops and wait for them to end.  Each loop must also check a stop flag its owner sets
    first: before Python 3.12 `asyncio.wait_for` (the worker handles' deadlines) swallows a cancellation that
    arrives as the call it waits for completes, so a loop relying on the cancellation alone would go on and this
    wait with it; with the flag it ends at its next turn."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
