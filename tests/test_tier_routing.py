"""Tier-aware routing: the policy prices CPU / disk hits by their measured cost, the router learns those costs from
heartbeats, and a decode worker pulls a prefix out of a peer's CPU tier (over the transport) instead of
recomputing it, with the peer's lease released and the output unchanged."""
import asyncio
import time

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.kv.tier_config import TierConfig
from disagg.protocol import Request, Role, SamplingParams, Tier
from disagg.router.index import TierMatch
from disagg.router.policy import PolicyConfig, RoutingPolicy, WorkerLoad
from disagg.router.router import RouterCore
from disagg.stats import Heartbeat, WorkerStats
from tests.fakes import LocalWorkerHandle, local_worker

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _loads(*names, **kw):
    return [WorkerLoad(n, **kw) for n in names]


def test_policy_prices_tier_hits_by_their_cost():
    policy = RoutingPolicy(PolicyConfig(seed=0, overlap_weight=1.0), block_size=16)
    matches = {"dev": TierMatch(device=8), "cpu": TierMatch(cpu=8), "disk": TierMatch(disk=8)}
    workers = _loads("dev", "cpu", "disk", "none")
    assert policy.choose(160, matches, workers, []).decode_worker == "dev"
    busy_dev = [WorkerLoad("dev", active_blocks=3), *_loads("cpu", "disk", "none")]
    assert policy.choose(160, matches, busy_dev, []).decode_worker == "cpu"  # 8 x 0.05 < 3 blocks of load
    costs = policy.choose(160, matches, _loads("cpu", "disk", "none"), []).costs
    assert costs["cpu"] < costs["disk"] < costs["none"]  # priors: CPU 0.05, disk 0.3 of recomputing
    slow = [WorkerLoad("disk", tier_cost={Tier.DISK: 1.7}), *_loads("none")]  # measured slower than prefill
    costs = policy.choose(160, {"disk": TierMatch(disk=8)}, slow, []).costs
    assert costs["disk"] == costs["none"]  # a tier slower than recomputing is worth nothing


def test_router_learns_tier_costs_from_heartbeats():
    core = RouterCore({}, {"w": None}, block_size=16)
    stats = WorkerStats(prefill_s_per_token=0.002, tier_load_s_per_block={Tier.CPU: 0.0016, Tier.DISK: 0.064})
    hb = Heartbeat("w", "i", Role.BOTH, 1, "", 0, False, 0.0, 0, "w-i", stats=stats)
    core.on_heartbeat("w", hb)
    assert core.loads["w"].tier_cost[Tier.CPU] == 0.0016 / (0.002 * 16)  # 0.05 of recomputing a block
    assert core.loads["w"].tier_cost[Tier.DISK] == 2.0


def test_decode_worker_pulls_a_prefix_from_a_peers_cpu_tier(tiny_llama_dir, tmp_path):
    tiers = TierConfig(cpu_bytes=2 << 20, disk_root="")
    a = LocalWorkerHandle(local_worker("a", tiny_llama_dir, tiers=tiers))
    b = LocalWorkerHandle(local_worker("b", tiny_llama_dir, tiers=tiers))
    prompt = list(range(40, 40 + 96)) + [7, 8, 9]  # 6 full blocks + 3 tokens
    reference = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, max_model_len=512))
    expected = reference.generate([prompt], GREEDY)[0].token_ids

    async def go():
        core = RouterCore({}, {"a": a, "b": b}, PolicyConfig(seed=0, min_peer_pull_blocks=2), 16)
        assert core.events is not None
        core.events.start()  # the core follows both workers' KV events (its other background tasks stay off)
        layouts = [await a.layout(1), await b.layout(1)]
        await a.set_peers(layouts, 1)
        await b.set_peers(layouts, 1)
        core.loads["b"].active_blocks = 10_000  # keep the first request on a
        tokens = [t async for d in core.generate(Request("warm", prompt, GREEDY)) for t in d.token_ids]
        assert tokens == expected
        await a.worker.flush_tiers()
        assert a.worker.engine.pool.reset_prefix_cache()  # a keeps the prefix only in its CPU tier now
        deadline = time.monotonic() + 5
        while len(core.index.blocks_of("a", Tier.CPU)) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        core.loads["b"].active_blocks = 0
        core.loads["a"].active_blocks = 10_000  # now a is busy: the request goes to b, which pulls from a
        pulled = [t async for d in core.generate(Request("pull", prompt, GREEDY)) for t in d.token_ids]
        decision = core.recent_decisions()[-1]
        b_stats, a_stats = WorkerStats.from_wire(await b.worker.stats()), WorkerStats.from_wire(await a.worker.stats())
        await core.events.stop()
        return pulled, decision, b_stats, a_stats
    pulled, decision, b_stats, a_stats = asyncio.run(go())
    assert pulled == expected
    assert decision["decode"] == "b" and decision["peer"] == "a" and decision["cpu_blocks"] == 0
    assert b_stats.transfer_reads == 1 and b_stats.loaded_tokens == 96  # 6 blocks read out of a's CPU tier
    assert a_stats.leases == 0  # the read's notification released a's export lease


def test_metrics_show_per_worker_tier_figures_with_their_values(tiny_llama_dir):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from disagg.router.metrics_view import cluster_snapshot
    from disagg.telemetry import RouterMetrics

    a = LocalWorkerHandle(local_worker("a", tiny_llama_dir, tiers=TierConfig(cpu_bytes=2 << 20, disk_root="")))
    prompt = list(range(60, 60 + 80))  # 5 full blocks

    async def go():
        core = RouterCore({}, {"a": a}, PolicyConfig(seed=0), 16)
        for _ in range(2):
            async for _ in core.generate(Request(f"r{_}", prompt, GREEDY)):
                pass
            await a.worker.flush_tiers()
            assert a.worker.engine.pool.reset_prefix_cache()  # the second request loads from the CPU tier
        await asyncio.sleep(0.2)  # the engine thread refreshes the heartbeat figures every 0.1 s
        await core.supervisor.probe("a")  # one heartbeat carries the worker's figures to the router
        return core, WorkerStats.from_wire(await a.worker.stats())
    core, stats = asyncio.run(go())
    samples = {(s.name, s.labels.get("worker"), s.labels.get("detail")): s.value
               for fam in text_string_to_metric_families(generate_latest(RouterMetrics(lambda: cluster_snapshot(core)).registry).decode())
               for s in fam.samples}
    assert samples[("disagg:worker_tier_loaded_blocks_total", "a", "cpu")] == 4  # the 5th block is computed
    assert samples[("disagg:worker_tier_hit_blocks_total", "a", "cpu")] == 4
    assert samples[("disagg:worker_tier_stored_blocks_total", "a", "cpu")] == 5
    assert samples[("disagg:worker_loaded_tokens_total", "a", "")] == stats.loaded_tokens == 64
    assert samples[("disagg:worker_kv_blocks_total", "a", "")] == 64
    # the store's levels (TierGauges) reach the heartbeat; no disk tier here, so no disk figures
    assert stats.tier_cpu_blocks == 5 and stats.tier_cpu_capacity_blocks >= 5 and stats.tier_pinned_blocks == 0
    assert stats.tier_stores_in_flight == 0 and stats.tier_disk_blocks is None and stats.tier_disk_bytes is None
    assert samples[("disagg:worker_state", "a", None)] == 1


def test_priority_headroom_adds_whole_slots_above_the_running_limit():
    from disagg.router.admission import CapacityConfig

    core = RouterCore({}, {"w": None}, block_size=16, capacity=CapacityConfig(max_running=4, priority_headroom=0.25))
    core.loads["w"].active_requests = 4
    assert not core.has_room("w", 16, priority=0)  # saturated for normal work
    assert core.has_room("w", 16, priority=5)  # one extra slot for urgent work
    core.loads["w"].active_requests = 5
    assert not core.has_room("w", 16, priority=5)
    small = RouterCore({}, {"w": None}, block_size=16, capacity=CapacityConfig(max_running=1, priority_headroom=0.25))
    small.loads["w"].active_requests = 1
    assert not small.has_room("w", 16, priority=5)  # 1.25 slots is one slot
