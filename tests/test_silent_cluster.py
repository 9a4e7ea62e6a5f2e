"""Silent failures on a real Ray cluster: 3 aggregated workers (the default model) as Ray actors, the router actor
with canaries and gray-failure detection on, each fault injected into a running worker through its `set_faults`
actor call (the workers are started with `allow_fault_injection`, as `disagg bench chaos` starts them):

  * corrupted weights: out of routing within 10 s (the canaries), and no wrong answer served after that;
  * NaN logits with requests on their way to the worker: no request lost, none wrong, the worker out;
  * a worker slowed 5x: drained within 30 s, and requests still served right by its peers;
  * no healthy worker is ever taken out (the clean requests before the faults included).

The figures over several injections each are `disagg bench chaos`'s (docs/benchmarks.md, silent faults).
"""
import asyncio
import time

import httpx
import pytest
import ray

from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.cluster.worker_config import FaultOrder
from disagg.config import EngineConfig, FaultConfig
from disagg.router.canary import CanaryConfig
from disagg.router.health import HealthConfig
from disagg.router.outliers import OutlierConfig
from disagg.router.policy import PolicyConfig, PolicyKind
from disagg.router.watch import SilentConfig

HEALTH = HealthConfig(heartbeat_interval_s=0.2, heartbeat_timeout_s=0.5, liveness_timeout_s=1.0, restart_after_s=2.0)
CANARY = CanaryConfig(enabled=True, idle_interval_s=1.0, busy_interval_s=2.0)  # the bench's pace (CHAOS_CANARY)
CORRUPT_GOAL_S, SLOW_GOAL_S = 10.0, 30.0  # the goals
PROMPTS = 6


@pytest.fixture(scope="module")
def service(ray_session, smollm_dir):
    engine = EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=32, num_threads=1, max_model_len=512)
    svc = Service(ClusterConfig(num_prefill=0, num_decode=3, engine=engine, tiers=None, allow_fault_injection=True),
                  RouterConfig(health=HEALTH, policy=PolicyConfig(kind=PolicyKind.ROUND_ROBIN),
                               silent=SilentConfig(canary=CANARY, outliers=OutlierConfig(enabled=True),
                                                   check_interval_s=0.25)))
    yield svc
    svc.shutdown()


def _body(model, i):
    return {"model": model, "prompt": [(37 * i + 11 * j) % 30000 + 100 for j in range(24 + 5 * i)],
            "max_tokens": 10, "temperature": 0, "ignore_eos": True}


async def _complete_all(url, model):
    """Every prompt at once: (text or None if the request failed, error)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        replies = await asyncio.gather(*(client.post("/v1/completions", json=_body(model, i)) for i in range(PROMPTS)))
    return [(r.json()["choices"][0]["text"], None) if r.status_code == 200 else (None, r.text) for r in replies]


def _health(service):
    return ray.get(service.router.health.remote(), timeout=10)


def _out_at(service, worker, state, since, timeout_s):
    """Wall time of the first health event taking `worker` to `state` after `since` (None: none in time)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        times = [e["wall_time"] for e in _health(service)["events"]
                 if e["worker"] == worker and e["state"] == state and e["wall_time"] >= since]
        if times:
            return min(times)
        time.sleep(0.1)
    return None


def _reason(service, worker, state, since):
    return next(e["reason"] for e in _health(service)["events"]
                if e["worker"] == worker and e["state"] == state and e["wall_time"] >= since)


def _all_ready(service, timeout_s=90.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if all(w["state"] == "ready" for w in _health(service)["workers"].values()):
            return True
        time.sleep(0.2)
    return False


def _inject(actor, faults):
    ray.get(actor.set_faults.remote(FaultOrder(faults).to_wire()), timeout=30)


def test_silent_faults_are_caught_on_a_real_cluster(service, smollm_dir):
    model = smollm_dir.name
    clean_from = time.time()
    reference = asyncio.run(_complete_all(service.url, model))
    assert all(err is None for _, err in reference), reference
    time.sleep(2.0)  # canaries run on every worker (the reference answer is set by their majority)
    a, b, c = service.cluster.decode_by_name
    actors = service.cluster.decode_by_name

    # corrupted weights (idle worker: the canary's to find): out within 10 s, then every answer right
    t = time.time()
    _inject(actors[a], FaultConfig(corrupt_layer=0, corrupt_scale=4.0))
    out = _out_at(service, a, "dead", t, 3 * CORRUPT_GOAL_S)
    assert out is not None and out - t <= CORRUPT_GOAL_S, (out, _health(service))
    assert "wrong canary answer" in _reason(service, a, "dead", t), _health(service)
    assert asyncio.run(_complete_all(service.url, model)) == reference  # no wrong answer after detection

    # NaN logits with requests on their way (round robin: some of them to b): none lost, none wrong, b out
    t = time.time()
    _inject(actors[b], FaultConfig(nan_from_step=1))
    assert asyncio.run(_complete_all(service.url, model)) == reference
    assert _out_at(service, b, "dead", t, 10.0) is not None
    assert "non-finite logits" in _reason(service, b, "dead", t), _health(service)

    # slowed 5x, once a and b are back (the detector compares a worker with its peers): drained within 30 s
    assert _all_ready(service), _health(service)
    t = time.time()
    _inject(actors[c], FaultConfig(slow_factor=5.0))
    out = _out_at(service, c, "drained", t, 2 * SLOW_GOAL_S)
    assert out is not None and out - t <= SLOW_GOAL_S, (out, _health(service))
    assert asyncio.run(_complete_all(service.url, model)) == reference  # served by the others, right
    _inject(actors[c], None)

    # no worker was taken out but the faulted ones, each after its injection; the restarted ones are clean
    events = _health(service)["events"]
    outs = [(e["worker"], e["state"]) for e in events
            if e["state"] in ("dead", "drained") and e["wall_time"] >= clean_from]
    assert set(outs) <= {(a, "dead"), (b, "dead"), (c, "drained")}, events
    assert all(_health(service)["workers"][w]["restarts"] >= 1 for w in (a, b))
