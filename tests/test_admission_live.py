"""Admission control on a live server (Ray worker, router actor, HTTP, the official openai client): a full queue
answers 429 with Retry-After and an OpenAI rate_limit_error body, a client that hangs up while queued leaves the
queue at once, the openai client's own retry gets through once load drops, and priorities jump the queue."""
import asyncio
import time

import httpx
import openai
import pytest

from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.config import EngineConfig
from disagg.router.admission import AdmissionConfig, CapacityConfig


@pytest.fixture(scope="module")
def service(ray_session, smollm_dir):
    svc = Service(ClusterConfig(num_prefill=0, num_decode=1, tiers=None,
                                engine=EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=128, num_threads=1)),
                  RouterConfig(capacity=CapacityConfig(max_running=1), admission=AdmissionConfig(max_queued_requests=2)))
    yield svc
    svc.shutdown()


def _body(model, max_tokens, **extra):
    return {"model": model, "prompt": [300 + i for i in range(24)], "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, **extra}


def _metric(url, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def _occupy(client, model, max_tokens=120):
    """A streaming request that holds the only slot until its tokens are out."""
    async with client.stream("POST", "/v1/completions", json=_body(model, max_tokens, stream=True)) as r:
        assert r.status_code == 200
        async for _ in r.aiter_lines():
            pass


async def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def test_full_queue_answers_429_fast_and_a_hung_up_client_leaves_the_queue(service, smollm_dir):
    model, url = smollm_dir.name, service.url

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            busy = asyncio.ensure_future(_occupy(client, model))
            assert await _wait_for(lambda: _metric(url, "disagg:num_requests_running") == 1)
            queued = [asyncio.ensure_future(client.post("/v1/completions", json=_body(model, 2))) for _ in range(2)]
            assert await _wait_for(lambda: _metric(url, "disagg:queue_depth") == 2)
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json=_body(model, 2))
            refused_in = time.perf_counter() - t0
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            queued[1].cancel()  # this client hangs up while queued
            assert await _wait_for(lambda: _metric(url, "disagg:queue_depth") == 1, timeout=5)
            await busy
            first = await queued[0]
            assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 2
            return refused_in
    refused_in = asyncio.run(go())
    assert refused_in < 0.5  # refused at once, not after a timeout
    assert _metric(url, "disagg:rejected_requests_total", reason="queue_full") >= 1
    assert _metric(url, "disagg:queue_wait_seconds_count") >= 2
    assert _metric(url, "disagg:queue_depth") == 0


def test_openai_client_retry_on_429_succeeds_once_load_drops(service, smollm_dir):
    model, url = smollm_dir.name, service.url
    rejected_before = _metric(url, "disagg:rejected_requests_total", reason="queue_full")

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            busy = asyncio.ensure_future(_occupy(client, model, max_tokens=40))
            assert await _wait_for(lambda: _metric(url, "disagg:num_requests_running") == 1)
            fillers = [asyncio.ensure_future(client.post("/v1/completions", json=_body(model, 2))) for _ in range(2)]
            assert await _wait_for(lambda: _metric(url, "disagg:queue_depth") == 2)
            retrying = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=6, timeout=120)
            reply = await retrying.completions.create(model=model, prompt=[400 + i for i in range(20)], max_tokens=3,
                                                      temperature=0)
            await busy
            await asyncio.gather(*fillers)
            return reply
    reply = asyncio.run(go())
    assert reply.usage.completion_tokens == 3
    assert _metric(url, "disagg:rejected_requests_total", reason="queue_full") > rejected_before  # it was refused


def test_higher_priority_is_served_before_queued_normal_requests(service, smollm_dir):
    model, url = smollm_dir.name, service.url
    done_order = []

    async def timed(client, name, **extra):
        r = await client.post("/v1/completions", json=_body(model, 2, **extra), headers=extra.pop("headers", {}))
        assert r.status_code == 200, r.text
        done_order.append(name)

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            busy = asyncio.ensure_future(_occupy(client, model, max_tokens=60))
            assert await _wait_for(lambda: _metric(url, "disagg:num_requests_running") == 1)
            normal = asyncio.ensure_future(timed(client, "normal"))
            assert await _wait_for(lambda: _metric(url, "disagg:queue_depth") == 1)
            urgent = asyncio.ensure_future(timed(client, "urgent", priority=10))
            assert await _wait_for(lambda: _metric(url, "disagg:queue_depth") == 2)
            assert _metric(url, "disagg:queue_depth", priority="10") == 1
            await asyncio.gather(busy, normal, urgent)
    asyncio.run(go())
    assert done_order == ["urgent", "normal"]


def test_bad_priority_is_a_400(service, smollm_dir):
    r = httpx.post(f"{service.url}/v1/completions", json=_body(smollm_dir.name, 2, priority=1000), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    r = httpx.post(f"{service.url}/v1/completions", json=_body(smollm_dir.name, 2),
                   headers={"X-Priority": "urgent"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "x-priority" in error["message"].lower(), error
