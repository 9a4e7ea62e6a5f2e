"""Prefill and decode workers as real Ray actors moving KV over real NIXL agents (UCX, DRAM, loopback)."""
import asyncio
import time

import pytest
import ray

from disagg.cluster.actors import PrefillWorker
from disagg.cluster.launch import ClusterConfig, LocalCluster
from disagg.cluster.worker_config import WorkerConfig
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.kv.tier_config import TierConfig
from disagg.protocol import PrefillResult, Request, SamplingParams, Tier, TokenDelta
from disagg.stats import WorkerStats

BLOCK = 16
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine_cfg(tiny_llama_dir):
    return dict(model=str(tiny_llama_dir), num_blocks=96, block_size=BLOCK, num_threads=1, max_model_len=512)


@pytest.fixture(scope="module")
def cluster(ray_session, engine_cfg, tmp_path_factory):
    tiers = TierConfig(cpu_bytes=4 << 20, disk_root=str(tmp_path_factory.mktemp("kv")))
    c = LocalCluster(ClusterConfig(num_prefill=1, num_decode=1, engine=EngineConfig(**engine_cfg), transfer_timeout_s=5,
                                   tiers=tiers))
    yield c
    c.shutdown()


def _run(coro):
    return asyncio.run(coro)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _all_blocks_free(cluster):
    return all(s.kv_blocks_free == s.kv_blocks_total and s.leases == 0 and s.adopted_blocks == 0
               for s in cluster.stats())


def test_disaggregated_output_equals_aggregated_engine(cluster, engine_cfg):
    shared = list(range(100, 148))  # 3 shared blocks
    prompts = [shared + list(range(3, 3 + n)) for n in (1, 9, 20, 40)] + [list(range(200, 205)), list(range(7, 70))]
    sampling = [GREEDY, GREEDY, SamplingParams(max_tokens=8, temperature=0.8, seed=7, ignore_eos=True)] + [GREEDY] * 3
    reference = LLMEngine(EngineConfig(**engine_cfg)).generate(prompts, sampling)

    async def go():
        return await asyncio.gather(*[cluster.client.complete(Request(f"eq-{i}", p, s))
                                      for i, (p, s) in enumerate(zip(prompts, sampling))])
    results = _run(go())
    assert [r[0] for r in results] == [r.token_ids for r in reference]
    assert _wait_for(lambda: _all_blocks_free(cluster))
    prefill, decode = cluster.stats()
    assert decode.transfer_reads > 0 and decode.transfer_failures == 0 and prefill.leases_expired == 0


def test_decode_reads_only_the_blocks_it_lacks(cluster):
    block_bytes = ray.get(cluster.decode[0].kv_block_bytes.remote())
    prefix = list(range(300, 300 + 4 * BLOCK))  # 4 full blocks

    def bytes_read():
        return cluster.stats()[1].transfer_bytes

    before = bytes_read()
    _run(cluster.client.complete(Request("bytes-1", prefix + [1, 2, 3], GREEDY)))
    assert bytes_read() - before == 5 * block_bytes  # nothing cached yet: 4 full blocks + the partial one
    before = bytes_read()
    _run(cluster.client.complete(Request("bytes-2", prefix + list(range(20, 40)), GREEDY)))
    # 4 prefix blocks are in the decode worker's prefix cache now: only the 2 blocks of the new tail move
    assert bytes_read() - before == 2 * block_bytes
    assert cluster.stats()[1].prefix_hit_tokens >= 4 * BLOCK
    assert _wait_for(lambda: _all_blocks_free(cluster))


def _stream(decode, request, prefill_bytes):
    async def go():
        tokens = []
        async for ref in decode.generate.remote(request.to_wire(), prefill_bytes):
            tokens += TokenDelta.from_wire(await ref).token_ids
        return tokens
    return _run(go())


def test_read_error_falls_back_to_recompute_and_frees_everything(cluster, engine_cfg):
    prompt = list(range(400, 450))
    expected = LLMEngine(EngineConfig(**engine_cfg)).generate([prompt], GREEDY)[0].token_ids
    request = Request("bad-read", prompt, GREEDY)
    result = PrefillResult.from_wire(ray.get(cluster.prefill[0].prefill.remote(request.to_wire())))
    assert cluster.stats()[0].leases == 1
    result.block_ids = [10_000 + b for b in result.block_ids]  # addresses outside the peer's registered cache
    failures = cluster.stats()[1].transfer_failures
    assert _stream(cluster.decode[0], request, result.to_wire()) == expected
    assert cluster.stats()[1].transfer_failures == failures + 1
    assert ray.get(cluster.prefill[0].release.remote("bad-read"))  # the coordinator's cleanup path
    assert _wait_for(lambda: _all_blocks_free(cluster))


def test_killed_prefill_peer_falls_back_to_recompute(ray_session, cluster, engine_cfg):
    config = WorkerConfig("prefill-doomed", engine=EngineConfig(**engine_cfg), transfer_timeout_s=3.0, tiers=None)
    doomed = PrefillWorker.options(max_restarts=0).remote(config.to_wire())
    ray.get(doomed.ready.remote())
    layouts = ray.get([w.layout.remote() for w in [*cluster.workers, doomed]])
    ray.get(cluster.decode[0].set_peers.remote(layouts))
    prompt = list(range(450, 490))
    expected = LLMEngine(EngineConfig(**engine_cfg)).generate([prompt], GREEDY)[0].token_ids
    request = Request("dead-peer", prompt, GREEDY)
    result = ray.get(doomed.prefill.remote(request.to_wire()))
    ray.kill(doomed)
    assert _wait_for(lambda: _is_dead(doomed))  # its NIXL agent is gone before the read
    assert _stream(cluster.decode[0], request, result) == expected
    assert cluster.stats()[1].transfer_failures >= 1
    assert _wait_for(lambda: _all_blocks_free(cluster))


def _is_dead(actor) -> bool:
    try:
        ray.get(actor.pid.remote(), timeout=5)
    except ray.exceptions.RayActorError:
        return True
    return False


def test_lease_expires_when_no_reader_comes(ray_session, engine_cfg):
    engine = EngineConfig(**engine_cfg, kv_lease_timeout_s=0.5)
    worker = PrefillWorker.remote(WorkerConfig("prefill-lease", engine=engine, transfer_timeout_s=3.0, tiers=None).to_wire())
    ray.get(worker.prefill.remote(Request("orphan", list(range(10, 50)), GREEDY).to_wire()))
    def stats():
        return WorkerStats.from_wire(ray.get(worker.stats.remote()))
    assert stats().leases == 1
    assert _wait_for(lambda: stats().leases_expired == 1, timeout=5)
    assert stats().kv_blocks_free == stats().kv_blocks_total
    ray.kill(worker)


def test_cancel_mid_stream_frees_blocks_on_both_workers(cluster):
    async def go():
        stream = cluster.client.generate(Request("cancel-me", list(range(460, 500)),
                                                 SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)))
        got = 0
        async for delta in stream:
            got += len(delta.token_ids)
            if got >= 3:
                break
        await stream.aclose()
        return got
    assert _run(go()) == 3
    assert _wait_for(lambda: _all_blocks_free(cluster))
    assert cluster.stats()[1].running == 0


def test_bad_request_is_rejected_and_workers_keep_serving(cluster):
    with pytest.raises(ValueError, match="prompt is empty"):
        _run(cluster.client.complete(Request("empty", [], GREEDY)))
    tokens, _, reason = _run(cluster.client.complete(Request("after-bad", [5, 6, 7], GREEDY)))
    assert len(tokens) == 12 and reason == "length"


def test_a_peer_reads_a_prefix_out_of_another_workers_cpu_tier_over_nixl(cluster, engine_cfg):
    owner, reader = cluster.prefill[0], cluster.decode[0]
    prefix = [(7 * i) % 500 + 3 for i in range(5 * BLOCK)]
    warm = Request("cpu-warm", prefix + [1, 2], GREEDY)
    ray.get(owner.prefill.remote(warm.to_wire()))
    ray.get(owner.release.remote("cpu-warm"))
    ray.get(owner.flush_tiers.remote())
    assert ray.get(owner.clear_device_cache.remote())  # the prefix now lives only in the owner's CPU tier
    request = Request("cpu-pull", prefix + list(range(40, 60)), GREEDY)
    offer = PrefillResult.from_wire(ray.get(owner.export_prefix.remote(request.to_wire())))
    assert offer.regions == [Tier.CPU] * 5 and offer.first_token is None and offer.num_tokens == 5 * BLOCK
    before = cluster.stats()[1]
    expected = LLMEngine(EngineConfig(**engine_cfg)).generate([request.prompt_token_ids], GREEDY)[0].token_ids
    assert _stream(reader, request, offer.to_wire()) == expected
    after = cluster.stats()[1]
    assert after.transfer_reads == before.transfer_reads + 1 and after.transfer_failures == before.transfer_failures
    assert after.loaded_tokens - before.loaded_tokens == 5 * BLOCK
    assert _wait_for(lambda: _all_blocks_free(cluster))  # the read's notification released the owner's lease
