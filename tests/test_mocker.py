"""The mocker (cluster/mocker.py): a real worker with the simulator's model - streams every token it is asked
for, deterministically, publishes KV events and wires up like a real worker, and spends the modelled step time
only when told to."""
import asyncio
import time

from disagg.cluster.mocker import mock_engine
from disagg.cluster.worker import EngineWorker
from disagg.cluster.worker_config import MockConfig, WorkerConfig
from disagg.config import EngineConfig
from disagg.protocol import KVEventPage, Request, SamplingParams, TokenDelta
from tests.fake_transport import LocalTransport


def _worker(model_dir, mock: MockConfig) -> EngineWorker:
    engine = EngineConfig(model=str(model_dir), block_size=16, max_model_len=512)
    return EngineWorker(WorkerConfig(name="m", engine=engine, tiers=None, mock=mock),
                        transport_factory=lambda agent, _engine: LocalTransport(agent))


async def _generate(worker: EngineWorker, rid: str, prompt: list[int], n: int) -> list[int]:
    req = Request(rid, prompt, SamplingParams(max_tokens=n, temperature=0))
    return [t async for data in worker.generate(req.to_wire()) for t in TokenDelta.from_wire(data).token_ids]


def test_a_mock_worker_streams_every_token_deterministically_and_publishes_kv_events(tiny_llama_dir):
    async def go():
        worker = _worker(tiny_llama_dir, MockConfig(num_blocks=64))
        prompt = list(range(100, 140))
        first = await _generate(worker, "a", prompt, 12)
        again = await _generate(worker, "a2", prompt, 12)
        layout = await worker.layout()  # wires up as a real worker does
        page = KVEventPage.from_wire(await worker.kv_events("", -1, 0.0))
        return first, again, layout, page

    first, again, layout, page = asyncio.run(go())
    assert len(first) == 12 and len(again) == 12  # no EOS: every request runs to its max_tokens
    assert first != again  # tokens depend on the request (ids differ), so generated blocks hash apart
    assert layout  # a layout message: peers can address its (token) KV memory
    assert page.batches and page.batches[0].events  # the prompt's blocks were announced


def test_the_mock_sleeps_its_modelled_step_time_only_when_told_to(tiny_llama_dir):
    engine = EngineConfig(model=str(tiny_llama_dir), block_size=16, max_model_len=512)
    timed = mock_engine(engine, MockConfig(num_blocks=64, time_scale=1.0))
    free = mock_engine(engine, MockConfig(num_blocks=64, time_scale=0.0))
    params = SamplingParams(max_tokens=5, temperature=0)
    t0 = time.perf_counter()
    free.generate([list(range(100, 140))], params)
    t_free = time.perf_counter() - t0
    t0 = time.perf_counter()
    timed.generate([list(range(100, 140))], params)
    t_timed = time.perf_counter() - t0
    # the default step-time model: >= 20 ms per step, 5 steps at least
    assert t_timed >= 5 * 0.02 > t_free, (t_timed, t_free)
