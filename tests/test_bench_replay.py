"""The bench harness's replay against a running service on the shared Ray cluster: agent sessions replayed turn by
turn (`disagg bench compare` end to end, which starts its own clusters, is tests/test_bench_compare.py's)."""
import asyncio

import httpx
import pytest

from bench.replay import ReplayConfig, replay
from disagg.kv.tier_config import TierConfig
from disagg.sim.spec import parse_configs
from disagg.workload import agent
from disagg.workload.metrics import SLO
from disagg.workload.record import TraceScale


@pytest.fixture(scope="module")
def service(ray_session, smollm_dir):
    from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
    from disagg.config import EngineConfig
    from disagg.router.policy import PolicyConfig, PolicyKind

    svc = Service(ClusterConfig(num_prefill=0, num_decode=1,
                                engine=EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=96, max_model_len=1024,
                                                    num_threads=1)),
                  RouterConfig(policy=PolicyConfig(kind=PolicyKind.KV)))
    yield svc
    svc.shutdown()


def test_agent_sessions_send_each_turn_after_the_previous_one_plus_think_time(service):
    trace = agent.generate({"short_chat": 1}, 4, 2.0, seed=1)
    scale = TraceScale(block_tokens=16, output_scale=0.01, time_scale=10, max_output_tokens=3)
    result = asyncio.run(replay(trace, ReplayConfig(url=service.url, scale=scale, progress=False)))
    m = result.metrics(SLO())
    assert m["completed"] == len(trace) and m["failed"] == 0, m["errors"]
    by_session: dict[str, list] = {}
    for rec in result.records:
        by_session.setdefault(rec.session_id, []).append(rec)
    assert len(by_session) == 4
    think = {(r.session_id, r.turn): scale.seconds(r.think_time_ms) for r in trace}
    for recs in by_session.values():
        recs.sort(key=lambda r: r.turn)
        for prev, cur in zip(recs, recs[1:]):
            assert cur.start_s >= prev.start_s + prev.e2e_s + think[(cur.session_id, cur.turn)] - 1e-3
    # later turns extend earlier ones: the worker's prefix cache serves part of them
    assert m["prefix_cache"]["hit_ratio"] > 0.3


def test_replay_counts_server_rejections_as_errors_and_keeps_going(service):
    trace = agent.generate({"short_chat": 1}, 2, 5.0, seed=2)[:3]
    scale = TraceScale(block_tokens=512, output_scale=1.0, max_output_tokens=4)  # prompts far past the context
    result = asyncio.run(replay(trace, ReplayConfig(url=service.url, scale=scale, progress=False)))
    assert all(r.error and "HTTP 400" in r.error and "context length" in r.error for r in result.records)
    ok = asyncio.run(replay(trace, ReplayConfig(url=service.url, scale=TraceScale(max_output_tokens=2),
                                                progress=False, arrival="fixed", rate=50.0)))
    assert all(r.ok for r in ok.records)


def test_replay_config_rejects_bad_arrival():
    with pytest.raises(ValueError, match="needs a positive rate"):
        ReplayConfig(url="http://127.0.0.1:1", arrival="poisson")
    with pytest.raises(ValueError, match="arrival must be"):
        ReplayConfig(url="http://127.0.0.1:1", arrival="sometimes")
    with pytest.raises(ValueError, match="name=PxD:policy"):
        parse_configs("agg-rr=2:round_robin")


def test_requests_due_at_the_same_moment_go_out_in_trace_order(monkeypatch):
    """A burst of requests with one timestamp (the Mooncake traces have bursts of a dozen) is sent in trace order,
    run after run, as the simulator sends it: the order decides which requests wait behind which."""
    import random

    import bench.replay as replay_module
    from disagg.workload.record import TraceRequest

    sent: list[int] = []

    async def fake_send(client, cfg, model, prompt, record, t0):
        sent.append(record.index)
        await asyncio.sleep(random.uniform(0, 0.01))  # answers come back in any order
        record.e2e_s = 0.01

    async def nothing(client):
        return None

    monkeypatch.setattr(replay_module, "_send", fake_send)
    monkeypatch.setattr(replay_module, "scrape_prefix_cache", nothing)
    monkeypatch.setattr(replay_module, "scrape_staleness", nothing)
    trace = [TraceRequest(0.0 if i < 12 else 50.0, 64, 4) for i in range(16)]
    cfg = ReplayConfig(url="http://127.0.0.1:9", model="m", progress=False)
    asyncio.run(replay(trace, cfg))
    assert sent == list(range(16))


def test_cluster_specs_size_both_tiers():
    default, small, nodisk, none = parse_configs(
        "a=0x2:kv,b=0x2:kv:cpu_tier_mb=64:disk_tier_mb=32,c=0x2:kv:cpu_tier_mb=64:disk_tier_mb=0,d=0x2:kv:cpu_tier_mb=0")
    assert default.tiers("/r") == TierConfig(disk_root="/r")
    assert small.tiers("/r") == TierConfig(cpu_bytes=64 << 20, disk_bytes=32 << 20, disk_root="/r")
    assert nodisk.tiers("/r") == TierConfig(cpu_bytes=64 << 20, disk_root="")  # "": no disk tier
    assert none.tiers("/r") is None


def test_the_routing_counters_a_run_adds_are_read_from_metrics():
    """The placement predictions' mean error and the routes per mode of one run: the difference of two scrapes."""
    from bench.scrape import routing_summary, scrape_routing

    pages = iter([
        '# TYPE disagg:ttft_predictions counter\ndisagg:ttft_predictions_total 4.0\n'
        'disagg:ttft_prediction_error_total 0.8\n'
        'disagg:ttft_prediction_relative_error_bucket{le="0.1"} 1.0\n'
        'disagg:ttft_prediction_relative_error_bucket{le="0.2"} 2.0\n'
        '# TYPE disagg:routed_requests counter\n'
        'disagg:routed_requests_total{decode_worker="d0",mode="local"} 3.0\n',
        'disagg:ttft_predictions_total 10.0\ndisagg:ttft_prediction_error_total 2.0\n'
        'disagg:ttft_prediction_relative_error_bucket{le="0.2"} 5.0\n'
        'disagg:routed_requests_total{decode_worker="d0",mode="local"} 5.0\n'
        'disagg:routed_requests_total{decode_worker="p0",mode="flexible"} 2.0\n'
        'disagg:routed_requests_total{decode_worker="d1",mode="local"} 1.0\n',
    ])

    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=next(pages)))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await scrape_routing(client), await scrape_routing(client)

    before, after = asyncio.run(go())
    summary = routing_summary(before, after)
    assert summary["ttft_predictions"] == 6 and abs(summary["ttft_prediction_error_mean"] - 0.2) < 1e-9
    assert summary["ttft_predictions_within_20pct"] == 0.5  # 3 of the run's 6: its median error is <= 20%
    assert summary["routes"] == {"local": 3.0, "flexible": 2.0}
    refused = httpx.MockTransport(lambda request: httpx.Response(403, json={"error": {}}))

    async def scrape_refused():
        async with httpx.AsyncClient(transport=refused, base_url="http://x") as client:
            return await scrape_routing(client)

    assert asyncio.run(scrape_refused()) is None and routing_summary(None, None) is None
