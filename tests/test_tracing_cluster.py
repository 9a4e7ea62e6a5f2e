"""Tracing on a real cluster: 1 prefill + 2 decode Ray workers, the router actor, HTTP clients.  Every request
yields one connected trace with every stage, the client's traceparent is honoured, and the stage breakdown the
bench computes adds up to the client's end-to-end time."""
import time

import httpx
import pytest

from bench import stages
from disagg.workload.metrics import RequestRecord
from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.config import EngineConfig
from disagg.router.policy import PolicyConfig
from disagg.tracing import TracingConfig


@pytest.fixture(scope="module")
def traced(ray_session, smollm_dir, tmp_path_factory):
    spans_dir = tmp_path_factory.mktemp("spans")
    svc = Service(ClusterConfig(num_prefill=1, num_decode=2, tiers=None, tracing=TracingConfig(file_dir=str(spans_dir)),
                                engine=EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=128, num_threads=1)),
                  RouterConfig(policy=PolicyConfig(min_remote_prefill_tokens=16)))
    yield svc, spans_dir
    svc.shutdown()


def test_every_request_is_one_connected_trace_with_every_stage(traced, smollm_dir):
    svc, spans_dir = traced
    client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    records = []
    with httpx.Client(base_url=svc.url, timeout=120) as http:
        for i in range(6):
            headers = {"traceparent": f"00-{client_trace}-00f067aa0ba902b7-01"} if i == 0 else {}
            # requests long enough that 2% of E2E is more than the HTTP hop's few ms ("other": outside the
            # router's span by definition); at 80 + 8 tokens E2E is ~330 ms and the hop alone reached 2% under load
            body = {"model": smollm_dir.name, "prompt": [(41 * i + 7 * j) % 40000 + 300 for j in range(200)],
                    "max_tokens": 24, "ignore_eos": True, "temperature": 0}
            t0 = time.perf_counter()
            r = http.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 200
            rec = RequestRecord(i, 200, 24, 0.0, e2e_s=time.perf_counter() - t0, ttft_s=0.0, output_tokens=24)
            rec.request_id = r.json()["id"]
            records.append(rec)
    time.sleep(1.5)  # exporters flush every 200 ms
    spans = stages.load_spans(spans_dir)
    traces = stages.per_request(spans)
    assert set(traces) == {r.request_id for r in records}  # 100% of requests produced a trace
    for rid, t in traces.items():
        names = {s["name"] for s in t["spans"]}
        for stage in stages.STAGES:
            assert stage in names, (rid, stage, names)
        root = t["root"]
        assert all(s["parent_id"] == root["span_id"] for s in t["spans"] if s is not root)  # connected
        services = {s["service"] for s in t["spans"]}
        assert services == {"disagg-router", "disagg-worker"}
        workers = {s["attributes"].get("disagg.worker") for s in t["spans"] if s["service"] == "disagg-worker"}
        assert len(workers) == 2  # the prefill worker and one decode worker
        assert root["attributes"]["gen_ai.usage.output_tokens"] == 24
        assert root["attributes"]["gen_ai.request.model"] == smollm_dir.name
    assert traces[records[0].request_id]["trace_id"] == client_trace  # the client's trace continues here
    result = stages.breakdown(records, spans)
    assert result["traced"] == 6
    assert result["named_within_2pct_of_e2e"] >= 5 / 6  # measured here: 6 of 6 (18 ms unaccounted of 1.9 s)
    # the named stages account for the client's E2E: what they leave (compared, not derived) is small
    assert result["stages"]["unaccounted"]["p50_ms"] < 0.05 * result["stages"]["e2e"]["p50_ms"]
    # and the HTTP hop outside the router's span stays a few ms once warm. The first request (a cold connection, the
    # router's first use of the completion path) is the slowest of the six every time: 16-18 ms alone against 6-11
    # for the others, 25-28 ms under the full suite on 2 cores; it gets its own, looser bound
    assert stages.breakdown(records[1:], spans)["stages"]["other"]["p99_ms"] < 25
    assert result["stages"]["other"]["p99_ms"] < 50
    assert result["every_stage"] == 1.0 and result["remote_prefill"] == 1.0
    assert result["stages"]["transit"]["p50_ms"] < 0.05 * result["stages"]["e2e"]["p50_ms"]
    assert result["stages"]["prefill.compute"]["p50_ms"] > 0 and result["stages"]["kv.transfer"]["p50_ms"] > 0
