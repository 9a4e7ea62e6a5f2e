"""Role changes at runtime on a real cluster (Ray, 1 prefill + 1 decode worker, HTTP on 127.0.0.1): the prefill
worker becomes a decode worker and back while streams are in flight.  No request is lost, every output equals
the no-change reference, the router's accounting and the workers' pools come back to baseline, and the workers
announce their new roles."""
import asyncio
import json
import time

import httpx
import pytest
import ray

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.protocol import SamplingParams
from disagg.stats import Heartbeat

TOPICS = ["owls", "tea", "rivers", "glaciers", "violins", "bread", "chess", "deserts"]


def _prompt(i: int) -> list[dict]:  # > 16 tokens: routed to the prefill worker while it has that role
    return [{"role": "user", "content": f"Write four calm sentences about {TOPICS[i % len(TOPICS)]}, one per line, "
                                        f"for a reader aged {20 + i}."}]


@pytest.fixture(scope="module")
def service(pd_service):
    return pd_service


@pytest.fixture(scope="module")
def reference(smollm_dir):
    engine = LLMEngine(EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=128))
    prompts = [engine.tokenizer.encode_chat(_prompt(i)) for i in range(WAVES[-1].stop)]
    return [c.text for c in engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0))]


WAVES = (range(0, 4), range(4, 8), range(8, 10))  # before, between and after the two changes


async def _chat(client: httpx.AsyncClient, model: str, i: int, progress: dict[int, int]) -> str:
    body = {"model": model, "messages": _prompt(i), "max_tokens": 40, "temperature": 0, "stream": True}
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
                progress[i] = progress.get(i, 0) + 1
    return text


async def _until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _round_trip(service, model: str, worker: str) -> tuple[list[str], list[dict], list[dict]]:
    """Wave 1 streams; once each has its first token, the prefill worker becomes a decode worker; wave 2 is
    routed in the new layout and, once a stream decodes on the changed worker, it goes back to prefill: that
    change must drain (wait for the streams decoding on it) before it is announced.  Wave 3 runs after."""
    async def loads() -> dict:
        return (await asyncio.to_thread(ray.get, service.router.health.remote()))["loads"][worker]

    progress: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=service.url, timeout=300) as client:
        first = [asyncio.create_task(_chat(client, model, i, progress)) for i in WAVES[0]]

        async def first_tokens() -> bool:
            return all(progress.get(i, 0) > 0 for i in WAVES[0])
        await _until(first_tokens, "wave 1's first tokens")
        assert not all(t.done() for t in first)  # streams are in flight across the change
        to_decode = await client.post(f"/admin/workers/{worker}/role", json={"role": "decode", "reason": "test"})
        second = [asyncio.create_task(_chat(client, model, i, progress)) for i in WAVES[1]]

        async def decoding_on_worker() -> bool:
            return (await loads())["active_requests"] > 0
        await _until(decoding_on_worker, "a wave-2 stream decoding on the changed worker")
        to_prefill = await client.post(f"/admin/workers/{worker}/role", json={"role": "prefill", "reason": "test"})
        after_drain = await loads()  # DRAINING returned: nothing of the decode role may be left on the worker
        third = [asyncio.create_task(_chat(client, model, i, progress)) for i in WAVES[2]]
        texts = await asyncio.gather(*first, *second, *third)
        return list(texts), [to_decode.json(), to_prefill.json()], [after_drain]


def test_role_change_under_load_loses_nothing(service, reference, smollm_dir):
    [prefill] = service.cluster.prefill_by_name
    texts, changes, (after_drain,) = asyncio.run(_round_trip(service, smollm_dir.name, prefill))
    assert texts == reference
    assert [(c["from"], c["to"], c["state"], c["announced"]) for c in changes] == [
        ("prefill", "decode", "done", True), ("decode", "prefill", "done", True)]
    # the change back waited for the streams decoding on the worker: none was left when it returned
    assert after_drain["active_requests"] == 0, after_drain
    roles = httpx.get(f"{service.url}/admin/roles").json()
    assert roles["roles"][prefill] == "prefill" and len(roles["changes"]) == 2
    metrics = httpx.get(f"{service.url}/metrics").text
    assert 'disagg:role_changes_total{from="prefill",to="decode"} 1.0' in metrics
    assert 'disagg:role_changes_total{from="decode",to="prefill"} 1.0' in metrics
    # baseline: no request counted anywhere, every block free again (leases released), roles announced
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        beats = {n: Heartbeat.from_wire(ray.get(w.heartbeat.remote()))
                 for n, w in {**service.cluster.prefill_by_name, **service.cluster.decode_by_name}.items()}
        if all(b.stats.kv_blocks_free == b.stats.kv_blocks_total and b.stats.leases == 0
               for b in beats.values()):
            break
        time.sleep(0.1)
    assert all(b.stats.kv_blocks_free == b.stats.kv_blocks_total for b in beats.values()), \
        {n: b.stats for n, b in beats.items()}
    assert all(b.stats.leases == 0 and b.stats.running == 0 for b in beats.values())
    assert beats[prefill].role == "prefill"
    health = httpx.get(f"{service.url}/health").json()
    assert health["prefill_workers"] == 1 and health["decode_workers"] == 1


def test_bad_role_changes_are_clear_4xx(service):
    [decode] = service.cluster.decode_by_name
    r = httpx.post(f"{service.url}/admin/workers/{decode}/role", json={"role": "prefill"})
    assert r.status_code == 400 and "last decode-capable" in r.json()["error"]["message"]
    r = httpx.post(f"{service.url}/admin/workers/nobody/role", json={"role": "decode"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "worker"
    r = httpx.post(f"{service.url}/admin/workers/{decode}/role", json={"role": "wizard"})
    assert r.status_code == 400
