"""Sleep and wake (issue 25, part 3; engine/sleep.py, the worker's calls): a sleeping engine gives its KV pages back to
the operating system (the process's resident memory drops by them), forgets its prefix cache (a CLEARED event),
refuses requests, and after a wake answers exactly as before.  The cluster-wide path over HTTP (drain, 503s,
adapters, wake) is in tests/test_multi_model.py."""
import asyncio
import mmap

import pytest
import torch

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.sleep import Sleeper, release_pages, resident_bytes
from disagg.errors import Conflict, InvalidRequest, ModelUnavailable
from disagg.protocol import EventKind, Request, SamplingParams, SleepReport, SleepState
from tests.fakes import local_worker

GREEDY = SamplingParams(max_tokens=8, temperature=0)
PROMPT = [(7 * i + 3) % 250 + 2 for i in range(57)]  # token ids: the tiny model has no tokenizer


def test_release_pages_zeroes_only_the_whole_pages_inside_the_tensor():
    page = mmap.PAGESIZE // 4  # float32s per page
    big = torch.ones(256 * page)
    inner = big[1000:200 * page + 7]  # starts and ends mid-page
    released = release_pages(inner)
    assert released > 0 and released % mmap.PAGESIZE == 0
    assert released <= inner.numel() * 4
    assert bool((big[:1000] == 1).all()) and bool((big[200 * page + 7:] == 1).all())  # outside: untouched
    zeros = int((inner == 0).sum())
    assert zeros * 4 == released  # exactly the released pages read back as zeros
    assert release_pages(torch.ones(10)) == 0  # smaller than a page: nothing


def test_a_sleeping_engine_gives_its_kv_back_and_wakes_to_the_same_answers(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), kv_cache_memory_mb=96, num_threads=1))
    ids = PROMPT
    before = engine.generate([ids], GREEDY)[0]
    assert engine.generate([ids], GREEDY)[0].num_cached_tokens > 0  # its prefix is cached
    engine.drain_kv_events()
    sleeper = Sleeper(engine, "w0")
    resident = resident_bytes()
    report = sleeper.sleep()
    kv_bytes = engine.kv_tensor.numel() * engine.kv_tensor.element_size()
    assert report.state is SleepState.ASLEEP and report.released_bytes >= 0.99 * kv_bytes
    assert resident - report.resident_bytes >= 0.8 * report.released_bytes  # the OS has the pages back
    assert [e.kind for e in engine.drain_kv_events()] == [EventKind.CLEARED]  # routers forget its blocks
    assert sleeper.sleep().released_bytes == 0  # asleep already: nothing more
    woke = sleeper.wake()
    assert woke.state is SleepState.AWAKE and woke.seconds < 0.1
    after = engine.generate([ids], GREEDY)[0]
    assert after.token_ids == before.token_ids and after.num_cached_tokens == 0  # same answer, cache forgotten


def test_an_engine_with_work_in_flight_refuses_to_sleep(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, num_threads=1))
    engine.add(Request("r1", PROMPT, GREEDY))
    with pytest.raises(Conflict, match="still running"):
        Sleeper(engine, "w0").sleep()
    while engine.has_unfinished():
        engine.step()
    assert Sleeper(engine, "w0").sleep().state is SleepState.ASLEEP


def test_a_sleeping_worker_refuses_requests_and_offers_no_kv(tiny_llama_dir):
    async def run():
        worker = local_worker("w0", tiny_llama_dir)
        await worker.ready()
        request = Request("r1", PROMPT, GREEDY)
        report = SleepReport.from_wire(await worker.sleep())
        assert report.worker == "w0" and report.state is SleepState.ASLEEP
        with pytest.raises(ModelUnavailable, match="asleep"):
            async for _ in worker.generate(request.to_wire()):
                pass
        assert await worker.export_prefix(request.to_wire()) is None
        assert SleepReport.from_wire(await worker.wake()).state is SleepState.AWAKE
        deltas = [d async for d in worker.generate(request.to_wire())]
        assert deltas  # serving again

    asyncio.run(run())


class _Handle:
    """A worker that sleeps, or refuses to (a GPU worker's reason, or a lease never released)."""

    def __init__(self, name, refusal=None):
        self.name, self.refusal, self.asleep = name, refusal, False

    async def sleep(self, timeout_s):
        if self.refusal is not None:
            raise self.refusal
        self.asleep = True
        return SleepReport(self.name, SleepState.ASLEEP, 1 << 20, 0.0, 0)

    async def wake(self, timeout_s):
        self.asleep = False
        return SleepReport(self.name, SleepState.AWAKE, 0, 0.0, 0)


@pytest.mark.parametrize("refusal", [InvalidRequest("w1: sleep frees host pages; not on cuda", code="sleep_unsupported"),
                                     Conflict("w1: KV blocks are still leased to a reader")])
def test_a_sleep_a_worker_refuses_leaves_the_model_serving_and_every_worker_awake(refusal):
    from disagg.http.admin_sleep import sleep_model, wake_model
    from disagg.http.config import ApiConfig
    from disagg.http.models import ModelState, ServedModel
    from disagg.router.router import RouterCore

    handles = {"w0": _Handle("w0"), "w1": _Handle("w1", refusal), "w2": _Handle("w2")}
    model = ServedModel("m", RouterCore({}, handles), None, 512)
    config = ApiConfig(model_drain_timeout_s=0.2, model_drain_poll_s=0.01)
    with pytest.raises(type(refusal)):
        asyncio.run(sleep_model(model, config))
    assert model.state is ModelState.SERVING and not any(h.asleep for h in handles.values())
    handles["w1"].refusal = None  # the lease is released: now it sleeps, and wakes
    slept = asyncio.run(sleep_model(model, config))
    assert slept["released_bytes"] == 3 << 20 and all(h.asleep for h in handles.values())
    assert model.state is ModelState.SLEEPING
    assert asyncio.run(wake_model(model, config))["state"] == "serving"
    assert not any(h.asleep for h in handles.values())
