"""Router replicas on a real cluster (cluster/replicas.py): two replicas behind Ray Serve's HTTP proxy, in front
of two aggregated workers.

  * both replicas build the same KV index from the workers' events: a prompt's prefix is a cache hit whichever
    replica routes the next request that shares it;
  * a replica SIGKILLed with 8 streams in flight: every stream completes byte-identical to a clean run - the ones
    the dead replica relayed reconnect with `Last-Event-ID` and get the rest from the worker's token journal - and
    a new request is served within 2 s of the kill.
"""
import asyncio
import dataclasses
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

FAST_HEALTH = HealthConfig(heartbeat_interval_s=0.2, heartbeat_timeout_s=0.5, liveness_timeout_s=1.0,
                           restart_after_s=2.0)
NEW_REQUEST_WITHIN_S = 2.0  # the bound: a new request is served this soon after a replica dies


@pytest.fixture(scope="module")
def replicated(ray_session, smollm_dir):
    engine = EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=64, num_threads=1, max_model_len=1024)
    svc = Service(ClusterConfig(num_prefill=0, num_decode=2, engine=engine, tiers=None),
                  RouterConfig(replicas=2, health=FAST_HEALTH))
    yield svc
    svc.shutdown()


def test_each_replica_takes_a_share_of_the_capacity_follows_worker_roles_and_only_the_first_plans():
    from disagg.cluster.replicas import for_replica
    from disagg.planner.policy import PlannerConfig
    from disagg.router.admission import CapacityConfig

    base = RouterConfig(replicas=3, capacity=CapacityConfig(max_prefill_queue_tokens=4096, max_running=64,
                                                              max_kv_fraction=0.9),
                        planner=PlannerConfig(enabled=True))
    first, other = for_replica(base, 0, 3), for_replica(base, 2, 3)
    assert first.capacity.max_running == other.capacity.max_running == 21  # 3 x 21 <= 64: never oversubscribed
    assert first.capacity.max_prefill_queue_tokens == 1365
    assert abs(first.capacity.max_kv_fraction - 0.3) < 1e-9
    assert first.planner.enabled and not other.planner.enabled
    assert first.core.roles.follow_workers and other.core.roles.follow_workers
    assert not base.core.roles.follow_workers  # the input is not modified
    from disagg.vision.stage import EncodeConfig

    six = dataclasses.replace(base, encode=EncodeConfig(max_inflight_per_encoder=6))
    assert for_replica(six, 1, 3).encode.max_inflight_per_encoder == 2  # 3 x 2: an encoder's slots, shared
    assert for_replica(base, 1, 3).encode.max_inflight_per_encoder == 1  # 2 slots over 3 replicas: one each at least


def test_each_replica_enforces_a_share_of_every_keys_rate_limit():
    from disagg.cluster.replicas import for_replica
    from disagg.http.config import ApiKey

    keys = {"k1": ApiKey("a", requests_per_s=9.0, burst=10), "k2": ApiKey("b", requests_per_s=3.0),
            "k3": ApiKey("c")}
    share = for_replica(RouterConfig(replicas=3, keys=keys), 1, 3).keys
    assert (share["k1"].requests_per_s, share["k1"].burst) == (3.0, 4)  # 3 x 3/s: the key's 9/s overall
    assert (share["k2"].requests_per_s, share["k2"].burst) == (1.0, 0)  # burst 0: a second's worth of the share
    assert share["k3"] == keys["k3"] and keys["k1"].requests_per_s == 9.0  # no limit stays none; input unchanged


def _replicas() -> dict[int, int]:
    """The live replicas: process id -> requests in flight (named actors in Serve's namespace; no dashboard)."""
    def in_flight(_actor) -> int | None:  # runs in the replica's process (a nested function travels by value)
        from ray import serve

        replica = serve.get_replica_context().servable_object
        if replica is None:  # a replacement whose constructor has not finished: not live yet
            return None
        return sum(load.active_requests for load in replica.service.core.loads.values())

    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith("SERVE_REPLICA::disagg#RouterReplica"):
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            try:
                pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=10)
                active = ray.get(actor.__ray_call__.remote(in_flight), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue  # dead, or being replaced
            if active is not None:
                found[pid] = active
    return found


def _replica_pids() -> list[int]:
    return list(_replicas())


def _prompt(i, n=60):
    return [(17 * i + 31 * j) % 40000 + 200 for j in range(n + 7 * i)]


def test_every_replica_routes_a_shared_prefix_to_the_worker_that_holds_it(replicated, smollm_dir):
    assert len(_replica_pids()) == 2
    prefix = _prompt(1, n=160)  # 167 tokens: 10 full blocks
    full = len(prefix) // 16 * 16
    body = {"model": smollm_dir.name, "max_tokens": 2, "temperature": 0}
    with httpx.Client(base_url=replicated.url, timeout=60) as client:
        first = client.post("/v1/completions", json={**body, "prompt": prefix + [5]})
        assert first.status_code == 200, first.text

        def cached(suffix):
            r = client.post("/v1/completions", json={**body, "prompt": prefix + suffix})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        deadline = time.monotonic() + 10  # the first request's blocks reach the replicas' indexes (events)
        while cached([6]) < full and time.monotonic() < deadline:
            time.sleep(0.05)
        # the proxy picks a replica at random among idle ones: 8 requests reach both with probability 1 - 2^-7;
        # a replica blind to the other's traffic would send about half of them to the worker without the prefix
        hits = [cached([7 + i]) for i in range(8)]
    assert all(h >= full for h in hits), hits


async def _stream(client, body, progress, key, last_id=None):
    """One SSE completion: (text, finish_reason, last event id, error or None)."""
    text, reason, error = "", None, None
    headers = {"Last-Event-ID": last_id} if last_id else {}
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return text, reason, last_id, f"HTTP {r.status_code}: {(await r.aread()).decode()}"
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    last_id = line[4:]
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return text, reason, last_id, data["error"]["message"]
                text += data["choices"][0]["text"]
                reason = data["choices"][0]["finish_reason"] or reason
                progress[key] = progress.get(key, 0) + 1
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:  # the relaying replica died
        return text, reason, last_id, f"cut: {type(exc).__name__}"
    return text, reason, last_id, error


async def _complete(client, body, progress, key):
    """Stream to the end, reconnecting with Last-Event-ID after a cut (as an SSE client does)."""
    text, reconnects, last_id = "", 0, None
    while True:
        part, reason, last_id, error = await _stream(client, body, progress, key, last_id)
        text += part
        if error is None:
            return text, reason, reconnects
        assert error.startswith("cut") and last_id is not None and reconnects < 3, (error, last_id, reconnects)
        reconnects += 1


def test_a_replica_killed_mid_stream_loses_no_stream_and_new_requests_are_served(replicated, smollm_dir):
    bodies = [{"model": smollm_dir.name, "prompt": _prompt(i), "max_tokens": 48, "ignore_eos": True,
               "temperature": 0, "stream": True} for i in range(8)]

    async def run(kill: bool):
        progress: dict[int, int] = {}
        async with httpx.AsyncClient(base_url=replicated.url, timeout=120) as client:
            tasks = [asyncio.ensure_future(_complete(client, b, progress, i)) for i, b in enumerate(bodies)]
            served_after_s = None
            if kill:
                deadline = time.monotonic() + 120
                while (len(progress) < len(bodies) or min(progress.values()) < 4) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                relaying = _replicas()
                victim = max(relaying, key=relaying.get)  # the busier one: it relays some of the streams
                assert relaying[victim] > 0, relaying
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
                while served_after_s is None:  # a new request, sent over and over until one is served
                    r = await client.post("/v1/completions", json={**bodies[0], "stream": False, "max_tokens": 1})
                    if r.status_code == 200:
                        served_after_s = time.monotonic() - killed
                    assert time.monotonic() - killed < 30, r.text
            return await asyncio.gather(*tasks), served_after_s

    reference, _ = asyncio.run(run(kill=False))
    assert all(reason == "length" for _, reason, _ in reference)
    faulted, served_after_s = asyncio.run(run(kill=True))
    assert [text for text, _, _ in faulted] == [text for text, _, _ in reference]
    assert all(reason == "length" for _, reason, _ in faulted)
    assert sum(reconnects for _, _, reconnects in faulted) >= 1  # the kill did cut streams
    print(f"replica SIGKILL: {sum(r for _, _, r in faulted)} reconnects, new request served after {served_after_s:.2f}s")
    assert served_after_s < NEW_REQUEST_WITHIN_S, served_after_s
    deadline = time.monotonic() + 60  # Serve replaces the dead replica
    while len(_replica_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_replica_pids()) == 2


def test_a_conversation_continues_from_any_replica(replicated, smollm_dir):
    """The Responses API's stored responses are shared by the replicas (cluster/shared_stores.py): each
    follow-up goes to whichever replica Serve's proxy picks, and every one finds the conversation (with a store
    per replica, 8 follow-ups would all land on the storing replica 1 time in 256)."""
    import openai

    client = openai.OpenAI(base_url=f"{replicated.url}/v1", api_key="unused", max_retries=0, timeout=120)
    first = client.responses.create(model=smollm_dir.name, input="Say hi.", max_output_tokens=4, temperature=0)
    for _ in range(8):
        follow = client.responses.create(model=smollm_dir.name, previous_response_id=first.id, input="Again.",
                                         max_output_tokens=2, temperature=0)
        assert follow.previous_response_id == first.id
        assert client.responses.retrieve(follow.id).id == follow.id
