"""Models at run time over real HTTP on a real Ray cluster, with mock workers (cluster/mocker.py: real workers,
scheduler, streams and sleep; no weights):
- idle models (http/idle.py): a model nobody asks for goes to sleep - its worker says so in its own heartbeat - and
  the next requests, sent together, wake it once and are all answered in full;
- a router SIGKILLed after run-time changes (cluster/runtime_table.py) comes back serving the model loaded at run
  time over the same workers, with its alias; shutting the service down ends those detached workers."""
import os
import shutil
import signal
import threading

import httpx
import ray

from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.cluster.worker_config import MockConfig
from disagg.config import EngineConfig
from disagg.http.config import IdleConfig
from disagg.models.deployment import deployment_of
from disagg.stats import Heartbeat
from tests.test_fleet_live import PROMPT
from tests.waiting import actor_gone as _gone
from tests.waiting import wait_for as _wait


def _service(router):
    deployment = deployment_of(
        {"models": [{"id": "m", "prefill": 0, "decode": 1}]}, base=EngineConfig(num_threads=1, max_model_len=1024)
    )
    return Service(ClusterConfig(tiers=None, mock=MockConfig(time_scale=1.0)), router, deployment=deployment)


def _metric(url, name):
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="m"}}'):
            return float(line.split()[-1])
    return 0.0


def _complete(url, model, out=None, i=0):
    reply = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 20}, timeout=60)
    answer = (reply.status_code, reply.json().get("usage", {}).get("completion_tokens"))
    if out is not None:
        out[i] = answer
    return answer


def test_an_idle_model_sleeps_and_requests_sent_together_wake_it_once(ray_session):
    service = _service(RouterConfig(idle=IdleConfig(sleep_after_idle_s=1.0, check_interval_s=0.2)))
    try:
        url = service.url
        state = lambda: httpx.get(f"{url}/admin/models").json()["models"][0]  # noqa: E731
        worker = next(iter(state()["workers"]))
        asleep = lambda: Heartbeat.from_wire(ray.get(ray.get_actor(worker).heartbeat.remote())).asleep  # noqa: E731
        _wait(lambda: state()["state"] == "sleeping" and asleep(), timeout_s=30)
        assert _metric(url, "disagg:model_idle_sleeps_total") == 1

        answers = [None] * 4
        threads = [threading.Thread(target=_complete, args=(url, "m", answers, i)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answers == [(200, 20)] * 4  # woken, not refused with a 503
        assert _metric(url, "disagg:model_request_wakes_total") == 1  # one wake for the four
        _wait(lambda: _metric(url, "disagg:model_idle_sleeps_total") == 2, timeout_s=30)  # asleep again when idle
    finally:
        service.shutdown()


def test_a_restarted_router_serves_the_models_loaded_at_run_time_and_shutdown_ends_their_workers(ray_session):
    service = _service(RouterConfig())
    url = service.url
    try:
        loaded = httpx.post(f"{url}/admin/models", json={"id": "b", "prefill": 0, "decode": 1}, timeout=60)
        assert loaded.status_code == 201, loaded.text
        assert httpx.put(f"{url}/admin/aliases/coder", json={"targets": {"b": 1}}).status_code == 200
        assert _complete(url, "coder") == (200, 20)
        listing = httpx.get(f"{url}/admin/models").json()["models"]
        (worker,) = next(m["workers"] for m in listing if m["id"] == "b")
        worker_pid = ray.get(ray.get_actor(worker).pid.remote())

        router_pid = ray.get(service.router.pid.remote())
        os.kill(router_pid, signal.SIGKILL)
        _wait(lambda: _pid(service.router) not in (None, router_pid), timeout_s=60)
        assert _wait(lambda: _ids(url), timeout_s=30) == ["m", "b", "coder"]
        assert _complete(url, "coder") == (200, 20) and _complete(url, "m") == (200, 20)
        assert ray.get(ray.get_actor(worker).pid.remote()) == worker_pid  # the same worker, not a new one
    finally:
        service.shutdown()
    _wait(lambda: _gone(worker), timeout_s=30)  # detached, so only the shutdown ends it


def _pid(actor):
    try:
        return ray.get(actor.pid.remote(), timeout=5)
    except (ray.exceptions.RayError, TimeoutError):  # being restarted
        return None


def _ids(url):
    try:
        return [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    except httpx.HTTPError:  # the restarted router is not listening yet
        return None


def test_a_model_whose_directory_went_away_is_not_served_again_and_its_workers_end(ray_session, tmp_path, smollm_dir):
    model_dir = tmp_path / "b-model"
    model_dir.mkdir()
    for f in smollm_dir.iterdir():  # the weights linked, the small files copied
        (model_dir / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, model_dir / f.name)
    service = _service(RouterConfig())
    url = service.url
    try:
        body = {"id": "b", "path": str(model_dir), "prefill": 0, "decode": 1}
        assert httpx.post(f"{url}/admin/models", json=body, timeout=60).status_code == 201
        listing = httpx.get(f"{url}/admin/models").json()["models"]
        (worker,) = next(m["workers"] for m in listing if m["id"] == "b")
        shutil.rmtree(model_dir)  # the restarted router cannot read its tokenizer any more
        router_pid = ray.get(service.router.pid.remote())
        os.kill(router_pid, signal.SIGKILL)
        _wait(lambda: _pid(service.router) not in (None, router_pid), timeout_s=60)
        assert _wait(lambda: _ids(url), timeout_s=30) == ["m"]  # the router starts, serving what it can
        assert _complete(url, "m") == (200, 20)
        _wait(lambda: _gone(worker), timeout_s=30)  # and nothing is left running for b
    finally:
        service.shutdown()
