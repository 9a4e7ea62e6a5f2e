"""One budget across models (issue 25, part 5) on a real Ray cluster over real HTTP, with mock workers
(cluster/mocker.py: real workers, scheduler, streams and sleep; no weights): model `a` has one awake worker and one
standby, model `b` two awake workers.  A burst on `a` makes the fleet planner park one of `b`'s workers (drained,
asleep) and wake `a`'s standby; every request completes, `b` keeps serving, and the workers say so themselves."""
import json
import threading

import httpx
import pytest
import ray

from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.cluster.worker_config import MockConfig
from disagg.config import EngineConfig
from disagg.models.deployment import deployment_of
from disagg.planner.fleet import FleetConfig
from disagg.router.admission import CapacityConfig
from disagg.stats import Heartbeat
from tests.waiting import wait_for as _wait

PROMPT = "The history of the printing press begins in the fifteenth century, when movable type changed how books"


@pytest.fixture(scope="module")
def service(ray_session):
    entries = [{"id": "a", "prefill": 0, "decode": 1, "standby": 1}, {"id": "b", "prefill": 0, "decode": 2}]
    deployment = deployment_of({"models": entries}, base=EngineConfig(num_threads=1, max_model_len=1024))
    fleet = FleetConfig(enabled=True, interval_s=0.2, confirm_rounds=2, cooldown_s=1.0, min_dwell_s=1.0)
    router = RouterConfig(capacity=CapacityConfig(max_running=4), fleet=fleet)
    svc = Service(ClusterConfig(tiers=None, mock=MockConfig(time_scale=1.0)), router, deployment=deployment)
    yield svc
    svc.shutdown()


def _stream(url, model, n, out, index):
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=url, timeout=120) as client, client.stream("POST", "/v1/completions", json=body) as reply:
        tokens, finish = 0, None
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                finish = (chunk["choices"][0]["finish_reason"] if chunk["choices"] else None) or finish
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        out[index] = (reply.status_code, finish, tokens)


def _asleep(name):
    return Heartbeat.from_wire(ray.get(ray.get_actor(name).heartbeat.remote())).asleep


def test_a_burst_on_one_model_moves_a_worker_from_the_quiet_one_and_loses_nothing(service):
    url = service.url
    fleet = lambda: httpx.get(f"{url}/admin/fleet").json()  # noqa: E731
    standby = service.clusters["a"].standby
    assert len(standby) == 1 and _asleep(standby[0])  # started asleep
    models = _wait(lambda: fleet()["models"])
    assert models["a"]["parked"] == standby and len(models["b"]["awake"]) == 2 and fleet()["moves"] == []

    results = [None] * 12
    streams = [threading.Thread(target=_stream, args=(url, "a", 200, results, i)) for i in range(12)]
    for t in streams:
        t.start()
    moves = _wait(lambda: fleet()["moves"])
    assert moves == [{"donor": "b", "recipient": "a", "reason": "demand", "count": 1}]
    for t in streams:
        t.join(120)
    assert results == [(200, "length", 200)] * 12  # nothing lost to the move

    status = fleet()
    (parked,) = status["models"]["b"]["parked"]
    assert _asleep(parked) and not _asleep(standby[0])  # the workers say so themselves
    assert standby[0] in status["models"]["a"]["awake"] and status["failed_moves"] == 0
    quiet = [None]
    _stream(url, "b", 8, quiet, 0)
    assert quiet == [(200, "length", 8)]  # b serves on its other worker
    metrics = httpx.get(f"{url}/metrics").text
    assert 'disagg:fleet_moves_total{donor="b",reason="demand",recipient="a"} 1.0' in metrics
    assert 'disagg:fleet_workers{model="b",state="parked"} 1.0' in metrics
