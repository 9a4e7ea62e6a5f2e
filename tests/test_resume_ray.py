"""The router actor SIGKILLed with 8 streams in flight (issue 23), on a real cluster (Ray on 127.0.0.1, the default
model): the worker keeps its streams in its journal, Ray restarts the router on the same port, every client
reconnects to the same URL with SSE Last-Event-ID, and every stream completes byte-identical to a reference run
(completions, chat, and the Messages and Responses APIs' typed-event streams)."""
import asyncio
import json
import os
import signal
import time

import httpx
import pytest
import ray

from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.config import EngineConfig
from disagg.router.health import HealthConfig

STREAMS = 8
FAST_HEALTH = HealthConfig(heartbeat_interval_s=0.2, heartbeat_timeout_s=0.5, liveness_timeout_s=1.0,
                           restart_after_s=2.0)


@pytest.fixture(scope="module")
def service(ray_session, smollm_dir):
    engine = EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=64, num_threads=1, max_model_len=1024)
    svc = Service(ClusterConfig(num_prefill=0, num_decode=1, engine=engine, tiers=None),
                  RouterConfig(health=FAST_HEALTH))
    yield svc
    svc.shutdown()


def _body(model, i):
    """(path, body): completions with token prompts, every fourth a chat (its role chunk is not sent again), and
    one each of the Messages and Responses APIs (greedy: they take no seed)."""
    sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": 100 + i}
    common = {"model": model, "max_tokens": 48, "ignore_eos": True, "stream": True, **sampling}
    question = f"Tell story {i}."
    if i == 1:
        body = {"model": model, "max_tokens": 48, "temperature": 0, "stream": True}
        return "/v1/messages", {**body, "messages": [{"role": "user", "content": question}]}
    if i == 5:
        body = {"model": model, "max_output_tokens": 48, "temperature": 0, "stream": True}
        return "/v1/responses", {**body, "input": question}
    if i % 4 == 3:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": question}]}
    prompt = [(17 * i + 31 * j) % 40000 + 200 for j in range(40 + 5 * i)]
    return "/v1/completions", {**common, "prompt": prompt}


_LAST_EVENTS = ("message_stop", "response.completed", "response.incomplete")


def _text(chunk):
    """The text an event adds (OpenAI chunks; the Messages and Responses APIs' typed events)."""
    kind = chunk.get("type")
    if kind == "content_block_delta":
        return chunk["delta"].get("text", "")
    if kind == "response.output_text.delta":
        return chunk["delta"]
    if kind is not None:
        return ""
    choice = chunk["choices"][0]
    return choice["delta"].get("content") or "" if "delta" in choice else choice["text"]


async def _resuming_sse(client, request, progress, key, deadline_s=120.0):
    """Stream a completion, reconnecting with Last-Event-ID whenever the connection breaks: (text, connections).
    An event counts once it is complete (its blank line), so a cut mid-event loses nothing and repeats nothing."""
    (path, body), text, last_id, connections = request, "", None, 0
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        connections += 1
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with client.stream("POST", path, json=body, headers=headers) as r:
                assert r.status_code in (200, 503), (r.status_code, await r.aread())
                if r.status_code == 503:
                    await asyncio.sleep(0.2)
                    continue
                event_id, data = None, None
                async for line in r.aiter_lines():
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and data is not None:
                        if data == "[DONE]":
                            return text, connections
                        chunk = json.loads(data)
                        assert "error" not in chunk and chunk.get("type") != "error", chunk
                        text += _text(chunk)
                        if chunk.get("type") in _LAST_EVENTS:
                            return text, connections
                        last_id, event_id, data = event_id, None, None
                        progress[key] = progress.get(key, 0) + 1
        except httpx.HTTPError:  # the router died under us (or is not back yet)
            await asyncio.sleep(0.2)
    raise AssertionError(f"stream {key} did not complete in {deadline_s}s")


async def _run_all(url, bodies, fault=None, after_chunks=4):
    progress = {}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120, connect=2)) as client:
        tasks = [asyncio.ensure_future(_resuming_sse(client, b, progress, i)) for i, b in enumerate(bodies)]
        if fault is not None:
            deadline = time.monotonic() + 120
            while (len(progress) < len(bodies) or min(progress.values()) < after_chunks) and \
                    time.monotonic() < deadline and not all(t.done() for t in tasks):
                await asyncio.sleep(0.02)
            fault()
        return await asyncio.gather(*tasks)


def test_router_sigkill_mid_stream_every_reconnecting_stream_completes_byte_identical(service, smollm_dir):
    bodies = [_body(smollm_dir.name, i) for i in range(STREAMS)]
    reference = asyncio.run(_run_all(service.url, bodies))
    assert all(connections == 1 for _, connections in reference)
    pid = ray.get(service.router.pid.remote())
    faulted = asyncio.run(_run_all(service.url, bodies, lambda: os.kill(pid, signal.SIGKILL)))
    assert ray.get(service.router.pid.remote()) != pid  # it really was restarted
    assert [text for text, _ in faulted] == [text for text, _ in reference]
    assert all(text for text, _ in reference)
    assert all(connections >= 2 for _, connections in faulted)  # every stream was cut and resumed
