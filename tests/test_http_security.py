"""Secure by default (issue 23): the real FastAPI app over a real routing core and an in-process worker, driven by
real HTTP requests (Starlette's TestClient, whose `client=` sets the peer address the app sees).

- /admin/* needs the admin scope; with no keys it answers loopback clients only (403 from anywhere else);
- with keys, the tenant comes from the key (X-Tenant-ID ignored), priority is capped by the key (403), each key has
  a token-bucket rate limit (429 + Retry-After), and a client's sampled traceparent forces a trace only for keys
  allowed to;
- keys are compared with hmac.compare_digest against every configured key;
- `disagg serve` refuses a non-loopback host without keys (unless --insecure), before anything starts.
"""
import hmac
import json

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from disagg import tracing as tr
from disagg.cluster import serve_cli as launch
from disagg.cluster.router_service import RouterConfig, RouterService
from disagg.engine.tokenizer import Tokenizer
from disagg.errors import InsecureExposure
from disagg.http.app import build_app
from disagg.http.config import ApiConfig, ApiKey
from disagg.http.models import ModelTable
from disagg.http.keys import load_keys_file
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore
from disagg.tracing import TracingConfig
from tests.fakes import LocalWorkerHandle, local_worker

REMOTE = ("10.0.0.5", 1234)
LOCAL = ("127.0.0.1", 1234)
ADMIN, ALICE, TRACER = "sk-admin-0123456789", "sk-alice-0123456789", "sk-tracer-0123456789"
KEYS = {
    ADMIN: ApiKey("ops", max_priority=100, admin=True),
    ALICE: ApiKey("alice", max_priority=10, requests_per_s=0.5, burst=3),
    TRACER: ApiKey("tracer", may_force_trace=True),
}
SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CLIENT_TRACE_ID = int("0af7651916cd43dd8448eb211c80319c", 16)


@pytest.fixture(scope="module")
def make_app(tiny_llama_dir, smollm_dir):
    """(app, core) over one in-process tiny-model worker. The tiny model has no tokenizer: the default model's
    validates and decodes its ids (prompts here are ids below the tiny vocabulary, 512)."""
    tokenizer = Tokenizer.from_dir(smollm_dir)

    def make(exporter=None, **api):
        worker = LocalWorkerHandle(local_worker("w", tiny_llama_dir))
        tracer = tr.make_tracer(TracingConfig(sampling_ratio=0.0), "router", exporter=exporter) if exporter else None
        core = RouterCore({}, {"w": worker}, PolicyConfig(seed=0), 16, tracer=tracer)
        return build_app(ModelTable.single("m", core, tokenizer, 512), ApiConfig(**api)), core

    return make


def _bearer(key):
    return {"Authorization": f"Bearer {key}"}


def _completion(**extra):
    return {"model": "m", "prompt": [300 + i for i in range(8)], "max_tokens": 2, "temperature": 0, **extra}


def test_admin_without_keys_answers_loopback_only(make_app):
    app, core = make_app()
    remote, local = TestClient(app, client=REMOTE), TestClient(app, client=LOCAL)
    r = remote.post("/admin/workers/w/role", json={"role": "prefill"})
    assert r.status_code == 403
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "permission_error", "param": None,
                                 "code": "admin_loopback_only"}
    assert remote.get("/admin/roles").status_code == 403
    assert core.health.workers["w"].role.value == "both"  # the refused call changed nothing
    assert local.get("/admin/roles").status_code == 200
    assert remote.get("/v1/models").status_code == 200  # only /admin is loopback-only


@pytest.mark.parametrize("api,key,status", [
    ({"keys": KEYS}, ALICE, 403),  # a tenant key
    ({"keys": KEYS}, ADMIN, 200),  # an admin key
    ({"keys": KEYS}, None, 401),
    ({"api_keys": {"k1": "alice"}}, "k1", 403),  # --api-keys: tenant keys
    ({"api_key": "operator"}, "operator", 200),  # --api-key: the operator's key
], ids=["tenant-key", "admin-key", "no-key", "legacy-tenant-key", "operator-key"])
def test_admin_needs_the_admin_scope(make_app, api, key, status):
    app, _ = make_app(**api)
    r = TestClient(app, client=LOCAL).get("/admin/roles", headers=_bearer(key) if key else {})
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["code"] == "admin_required"


def test_metrics_need_a_metrics_or_admin_key_and_without_keys_answer_loopback_only(make_app):
    app, _ = make_app()
    remote, local = TestClient(app, client=REMOTE), TestClient(app, client=LOCAL)
    r = remote.get("/metrics")
    assert r.status_code == 403 and r.json()["error"]["code"] == "metrics_loopback_only"
    assert local.get("/metrics").status_code == 200 and "disagg:" in local.get("/metrics").text
    scraper = "sk-prometheus-0123456789"
    app, _ = make_app(keys={**KEYS, scraper: ApiKey("monitoring", metrics=True)})
    remote = TestClient(app, client=REMOTE)
    assert remote.get("/metrics").status_code == 401  # no key
    r = remote.get("/metrics", headers=_bearer(ALICE))  # a tenant key reads no other tenant's counts
    assert r.status_code == 403 and r.json()["error"]["code"] == "metrics_scope_required"
    assert remote.get("/metrics", headers=_bearer(scraper)).status_code == 200
    assert remote.get("/metrics", headers=_bearer(ADMIN)).status_code == 200
    assert remote.get("/livez").status_code == 200  # the probes stay open: Kubernetes calls them without a key
    r = remote.post("/v1/completions", json=_completion(), headers=_bearer(scraper))
    assert r.status_code == 200  # a metrics key is a tenant key too (its own tenant)


def test_with_keys_the_tenant_comes_from_the_key_and_priority_is_capped(make_app):
    app, core = make_app(keys={ADMIN: KEYS[ADMIN], ALICE: ApiKey("alice", max_priority=10)})
    seen, generate = [], core.generate

    def spy(request, **kw):
        seen.append((kw["tenant"], kw["priority"]))
        return generate(request, **kw)

    core.generate = spy
    with TestClient(app, client=REMOTE) as client:
        for name in ("mallory-1", "mallory-2"):  # rotating names must not buy more fair share
            r = client.post("/v1/completions", json=_completion(), headers={**_bearer(ALICE), "X-Tenant-ID": name})
            assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json=_completion(priority=50), headers=_bearer(ALICE))
        assert r.status_code == 403 and r.json()["error"]["code"] == "priority_not_allowed", r.text
        assert r.json()["error"]["param"] == "priority"
        r = client.post("/v1/completions", json=_completion(), headers={**_bearer(ALICE), "X-Priority": "11"})
        assert r.status_code == 403
        assert client.post("/v1/completions", json=_completion(priority=10), headers=_bearer(ALICE)).status_code == 200
        assert client.post("/v1/completions", json=_completion(priority=90), headers=_bearer(ADMIN)).status_code == 200
    assert seen == [("alice", 0), ("alice", 0), ("alice", 10), ("ops", 90)]


def test_without_keys_the_tenant_header_still_names_the_tenant(make_app):
    app, core = make_app()
    seen, generate = [], core.generate

    def spy(request, **kw):
        seen.append(kw["tenant"])
        return generate(request, **kw)

    core.generate = spy
    with TestClient(app, client=LOCAL) as client:
        assert client.post("/v1/completions", json=_completion(), headers={"X-Tenant-ID": "bob"}).status_code == 200
    assert seen == ["bob"]


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(make_app):
    app, _ = make_app(keys=KEYS)
    client = TestClient(app, client=REMOTE)
    answers = [client.get("/v1/models", headers=_bearer(ALICE)) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]  # a burst of 3, then 0.5 requests/s
    refused = answers[-1]
    assert int(refused.headers["retry-after"]) == 2  # the next token is due in 2 s
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert client.get("/v1/models", headers=_bearer(ADMIN)).status_code == 200  # per key: others are not limited


def _traced(client, exporter, core, key):
    exporter.clear()
    r = client.post("/v1/completions", json=_completion(), headers={**_bearer(key), "traceparent": SAMPLED})
    assert r.status_code == 200, r.text
    assert tr.flush(core.tracer)
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == CLIENT_TRACE_ID]


def test_a_sampled_traceparent_forces_a_trace_only_for_keys_allowed_to(make_app):
    exporter = InMemorySpanExporter()
    app, core = make_app(exporter=exporter, keys=KEYS)  # the router itself samples nothing
    with TestClient(app, client=REMOTE) as client:
        assert _traced(client, exporter, core, ALICE) == []
        assert exporter.get_finished_spans() == ()  # and no new trace either: the router's sampling said no
        assert _traced(client, exporter, core, TRACER)  # the client's trace, continued


def test_keys_are_compared_in_constant_time_against_every_key(make_app, monkeypatch):
    app, _ = make_app(keys=KEYS)
    client = TestClient(app, client=REMOTE)
    calls, compare = [], hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or compare(a, b))
    for key, status in ((ADMIN, 200), (TRACER, 200), ("sk-nobody", 401)):  # first, last, none
        calls.clear()
        assert client.get("/v1/models", headers=_bearer(key)).status_code == status
        assert len(calls) == len(KEYS), key


def test_keys_file_takes_grants_and_the_older_tenant_only_format(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"a": {"tenant": "ops", "admin": True, "max_priority": 100, "requests_per_s": 2},
                                "b": "bob"}))
    assert load_keys_file(path) == {"a": ApiKey("ops", max_priority=100, admin=True, requests_per_s=2.0),
                                    "b": ApiKey("bob")}
    for bad in ({"a": {"tenant": "x", "admin": "yes"}}, {"a": {"admin": True}}, {"a": {"tenant": "x", "wat": 1}}, []):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            load_keys_file(path)
    for flag in ("--api-keys-file", "--api-keys"):
        path.write_text(json.dumps({"b": "bob"}))
        router = launch.router_config_from_args(launch.build_parser().parse_args([flag, str(path)]))
        assert router.keys == {"b": ApiKey("bob")}


class _Started(Exception):
    pass


def _no_cluster(*_a, **_k):
    raise _Started  # the check passed and serve went on to start the cluster


@pytest.mark.parametrize("argv,refused", [
    (["--host", "0.0.0.0"], True),
    (["--host", "10.1.2.3"], True),
    (["--host", "0.0.0.0", "--insecure"], False),
    (["--host", "0.0.0.0", "--api-key", "k"], False),
    (["--host", "127.0.0.1"], False),
    (["--host", "localhost"], False),
], ids=["any", "address", "insecure", "key", "loopback", "localhost"])
def test_serve_refuses_a_public_host_without_keys(monkeypatch, capsys, argv, refused):
    monkeypatch.setattr(launch, "Service", _no_cluster)
    if refused:
        assert launch.main(argv) == launch.EXIT_REFUSED
        assert "--insecure" in capsys.readouterr().err
    else:
        with pytest.raises(_Started):
            launch.main(argv)


def test_the_router_service_refuses_too():
    with pytest.raises(InsecureExposure):
        RouterService(RouterConfig(host="0.0.0.0"), {}, {})


def test_key_grants_reach_the_router_actor_intact():
    config = RouterConfig(keys=KEYS, insecure=True)
    back = RouterConfig.from_wire(config.to_wire())  # the router actor gets its config as these bytes
    assert back == config and isinstance(back.keys[ALICE], ApiKey)
