"""A worker with no request does not poll its engine flat out: it waits longer between ticks (up to
idle_max_sleep_s), and a request submitted meanwhile ends the wait at once instead of waiting it out."""
import asyncio
import dataclasses
import time

from disagg.protocol import Request, SamplingParams
from tests.fakes import local_worker

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
LONG_WAIT_S = 30.0  # beyond the test's own timeout: a request that waited it out would fail the test


def test_an_idle_worker_backs_off(tiny_llama_dir):
    worker = local_worker("w", tiny_llama_dir)

    async def go() -> int:
        await worker.ready()
        await asyncio.sleep(0.2)  # backing off: 4, 8, 16, 32, 50, 50 ... ms
        start = worker._steps
        await asyncio.sleep(0.5)
        return worker._steps - start

    idle_ticks = asyncio.run(go())
    assert idle_ticks <= 0.5 / worker.config.idle_max_sleep_s + 2, idle_ticks  # every 2 ms would be ~250


def test_a_request_wakes_an_idle_worker_at_once(tiny_llama_dir):
    worker = local_worker("w", tiny_llama_dir)
    worker.config = dataclasses.replace(worker.config, idle_max_sleep_s=LONG_WAIT_S)
    worker._idle_s = LONG_WAIT_S  # as after a long idle spell: the next wait is the longest

    async def go() -> float:
        await worker.ready()
        await asyncio.sleep(0.3)  # the loop is in its long wait now
        t0 = time.monotonic()
        async for _ in worker.generate(Request("r", list(range(20, 40)), GREEDY).to_wire()):
            pass
        return time.monotonic() - t0

    served_s = asyncio.run(asyncio.wait_for(go(), 20))
    assert served_s < 10, served_s  # woken by the submission, not by the 30 s timer
