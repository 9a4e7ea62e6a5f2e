"""KV-aware routing on a live cluster: 2 aggregated workers behind the router, kv policy vs round-robin."""
import time

import httpx
import ray

from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.config import EngineConfig
from disagg.router.policy import PolicyConfig, PolicyKind

PREFIX = [(i * 37) % 4000 + 100 for i in range(160)]  # 10 full blocks shared by every request


def _serve(smollm_dir, policy):
    return Service(ClusterConfig(num_prefill=0, num_decode=2,
                                 engine=EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=128, num_threads=1)),
                   RouterConfig(policy=PolicyConfig(kind=PolicyKind(policy), seed=0)))


def _send(service, model, suffix):
    r = httpx.post(f"{service.url}/v1/completions", timeout=120,
                   json={"model": model, "prompt": PREFIX + suffix, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text


def _hits(service):
    return {name: s.prefix_hit_tokens for name, s in zip(service.cluster.workers_by_name, service.cluster.stats())}


def _run_workload(service, model):
    _send(service, model, [7, 8, 9])
    first = ray.get(service.router.decisions.remote(1))[0]["decode"]
    deadline = time.monotonic() + 10  # KV events reach the router asynchronously
    while ray.get(service.router.index_size.remote())[first] < len(PREFIX) // 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    hits_before = _hits(service)
    for i in range(4):
        _send(service, model, [11 + i, 12 + i, 13 + i])
    decisions = ray.get(service.router.decisions.remote(4))
    hits_after = _hits(service)
    return first, decisions, {k: hits_after[k] - hits_before[k] for k in hits_after}


def test_kv_policy_routes_shared_prefix_to_the_worker_holding_it(ray_session, smollm_dir):
    service = _serve(smollm_dir, "kv")
    try:
        first, decisions, hit_delta = _run_workload(service, smollm_dir.name)
        assert [d["decode"] for d in decisions] == [first] * 4
        assert all(d["overlap_blocks"] == len(PREFIX) // 16 for d in decisions)
        assert hit_delta[first] == 4 * len(PREFIX)  # every prefix token of the 4 requests was a cache hit
        assert sum(hit_delta.values()) == hit_delta[first]
    finally:
        service.shutdown()


def test_round_robin_baseline_ignores_the_prefix(ray_session, smollm_dir):
    service = _serve(smollm_dir, "round_robin")
    try:
        first, decisions, hit_delta = _run_workload(service, smollm_dir.name)
        workers = [d["decode"] for d in decisions]
        assert len(set(workers)) == 2 and workers.count(first) == 2
        other = next(w for w in hit_delta if w != first)
        # the other worker computed the prefix once (miss), then hit it once: 160 tokens, not 2 x 160
        assert hit_delta[first] == 2 * len(PREFIX) and hit_delta[other] == len(PREFIX)
    finally:
        service.shutdown()
