"""Tenant cache isolation through the real front door (issue 23): a Ray cluster with one aggregated worker on
127.0.0.1, no keys (the X-Tenant-ID header names the tenant), token-id prompts over HTTP.  A tenant probing
another's prefix reads cached_tokens 0; the same tenant, or callers sharing a cache_salt, read the hit."""
import httpx
import pytest

from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.config import EngineConfig

PROMPT = list(range(1000, 1065))  # 4 full blocks of 16 and one token


@pytest.fixture(scope="module")
def service(ray_session, smollm_dir):
    svc = Service(ClusterConfig(num_prefill=0, num_decode=1,
                                engine=EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=128, num_threads=1)),
                  RouterConfig())
    yield svc
    svc.shutdown()


def _cached(service, smollm_dir, tenant, prompt=PROMPT, **extra):
    body = {"model": smollm_dir.name, "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}
    headers = {"X-Tenant-ID": tenant} if tenant else {}
    reply = httpx.post(f"{service.url}/v1/completions", json=body, headers=headers, timeout=120)
    assert reply.status_code == 200, reply.text
    details = reply.json()["usage"].get("prompt_tokens_details") or {}
    return details.get("cached_tokens", 0)


def test_cached_tokens_do_not_cross_tenants(service, smollm_dir):
    assert _cached(service, smollm_dir, "alice") == 0
    assert _cached(service, smollm_dir, "bob") == 0  # bob probes alice's prefix: nothing
    assert _cached(service, smollm_dir, None) == 0  # nor does the default tenant
    assert _cached(service, smollm_dir, "alice") == 64  # alice hits her own


def test_a_shared_cache_salt_shares_hits(service, smollm_dir):
    prompt = PROMPT[::-1]
    assert _cached(service, smollm_dir, "carol", prompt, cache_salt="team-x") == 0
    assert _cached(service, smollm_dir, "dave", prompt, cache_salt="team-x") == 64
    assert _cached(service, smollm_dir, "dave", prompt) == 0  # dave's own salt is not the shared one
