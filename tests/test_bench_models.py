"""Traces with a model per request (issue 25, part 6): the trace format carries the model, several models' traces
merge into one whose sessions stay apart, the replay asks each request's own model, and the figures and the report
are given per model.  The real-cluster runs are `python -m bench.multi_model` (docs/benchmarks.md)."""
import asyncio

import bench.replay as replay_module
from bench.replay import ReplayConfig, replay
from disagg.workload.metrics import SLO, RequestRecord, compute_metrics
from disagg.workload.record import TraceRequest, for_models
from disagg.workload.report import write_report


def test_a_trace_request_keeps_its_model_through_json():
    row = TraceRequest(5.0, 64, 8, [1, 2], model="coder@2").to_json()
    assert row["model"] == "coder@2"
    assert TraceRequest.from_json(row).model == "coder@2"
    assert "model" not in TraceRequest(5.0, 64, 8).to_json() and TraceRequest.from_json(
        {"timestamp": 1, "input_length": 2, "output_length": 3}).model is None


def test_several_models_traces_merge_in_arrival_order_with_their_sessions_apart():
    chat = [TraceRequest(0.0, 10, 1, session_id="s1", turn=0), TraceRequest(20.0, 10, 1)]
    code = [TraceRequest(10.0, 10, 1, session_id="s1", turn=0)]
    merged = for_models({"chat": chat, "code": code})
    assert [(r.timestamp_ms, r.model) for r in merged] == [(0.0, "chat"), (10.0, "code"), (20.0, "chat")]
    assert [r.session_id for r in merged] == ["chat/s1", "code/s1", None]  # one session id, two sessions
    assert chat[0].model is None  # the inputs are left as they were


def _record(i, model, ttft_s, ok=True):
    rec = RequestRecord(i, 100, 4, float(i), ttft_s=ttft_s, model=model)
    if ok:
        rec.e2e_s, rec.output_tokens = ttft_s + 0.3, 4
    else:
        rec.error = "HTTP 503: asleep"
    return rec


def test_figures_and_the_report_are_per_model_when_a_run_has_several(tmp_path):
    records = [_record(0, "chat", 0.1), _record(1, "chat", 5.0), _record(2, "code", 0.2), _record(3, "code", 0.2, False)]
    m = compute_metrics(records, 10.0, SLO(ttft_ms=1000))
    assert m["completed"] == 3 and m["request_goodput"] == 0.2
    chat, code = m["models"]["chat"], m["models"]["code"]
    assert (chat["completed"], chat["request_goodput"], chat["failed"]) == (2, 0.1, 0)
    assert (code["completed"], code["request_goodput"], code["failed"]) == (1, 0.1, 1)
    assert chat["p99_ttft_ms"] > 4000 > code["p99_ttft_ms"]
    assert "models" not in compute_metrics(records[:2], 10.0, SLO())  # one model: no breakdown
    paths = write_report(tmp_path, [{"label": "shared", "metrics": m}], {"title": "two models"})
    report = paths["markdown"].read_text()
    assert "Per model" in report and "| shared / chat |" in report and "| shared / code |" in report


def test_the_replay_asks_each_request_s_own_model(monkeypatch):
    asked: list[tuple[int, str]] = []

    async def fake_send(client, cfg, model, prompt, record, t0):
        asked.append((record.index, model))
        record.ttft_s, record.e2e_s, record.output_tokens = 0.01, 0.02, 1

    async def nothing(client):
        return None

    monkeypatch.setattr(replay_module, "_send", fake_send)
    monkeypatch.setattr(replay_module, "scrape_prefix_cache", nothing)
    monkeypatch.setattr(replay_module, "scrape_staleness", nothing)
    trace = for_models({"chat": [TraceRequest(0.0, 64, 1)], "code": [TraceRequest(1.0, 64, 1)]})
    trace.append(TraceRequest(2.0, 64, 1))  # no model: the replay's own
    result = asyncio.run(replay(trace, ReplayConfig(url="http://127.0.0.1:9", model="base", progress=False)))
    assert sorted(asked) == [(0, "chat"), (1, "code"), (2, "base")]
    assert [r.model for r in result.records] == ["chat", "code", "base"]
    assert set(result.metrics(SLO())["models"]) == {"base", "chat", "code"}
