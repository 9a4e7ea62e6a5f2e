"""Bench metrics on hand-made records: every figure checked against a value computed by hand."""
import json
import math

import pytest

from bench.report import rescore
from disagg.workload.metrics import SLO, RequestRecord, compute_metrics, parse_slos
from disagg.workload.report import markdown_table, write_report


def _records():
    # a: TTFT 100 ms, tokens at 100, 150, 250, 300 ms -> ITL 50, 100, 50; E2E 300 ms; TPOT (300-100)/3
    a = RequestRecord(0, prompt_tokens=10, max_tokens=4, start_s=0.0, ttft_s=0.1, e2e_s=0.3, output_tokens=4,
                      itl_s=[0.05, 0.1, 0.05])
    # b: TTFT 400 ms, tokens at 400, 500 ms -> ITL 100; E2E 500 ms; TPOT 100 ms
    b = RequestRecord(1, prompt_tokens=20, max_tokens=2, start_s=0.5, ttft_s=0.4, e2e_s=0.5, output_tokens=2,
                      itl_s=[0.1])
    # c: one token only: TTFT = E2E = 200 ms, no TPOT
    c = RequestRecord(2, prompt_tokens=30, max_tokens=1, start_s=0.7, ttft_s=0.2, e2e_s=0.2, output_tokens=1)
    d = RequestRecord(3, prompt_tokens=40, max_tokens=4, start_s=0.8, error="HTTP 400: too long")
    return [a, b, c, d]


def test_metrics_equal_hand_computed_values():
    m = compute_metrics(_records(), duration_s=2.0, slo=SLO(ttft_ms=250, tpot_ms=80),
                        prefix_cache={"hit_ratio": 0.25}, extra_slos=parse_slos("500/100"))
    assert (m["completed"], m["failed"], m["num_prompts"]) == (3, 1, 4)
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(33.5)
    assert m["mean_ttft_ms"] == pytest.approx(700 / 3)
    assert m["median_ttft_ms"] == pytest.approx(200)
    assert m["p90_ttft_ms"] == pytest.approx(360)  # 200 + 0.8 * (400 - 200), linear interpolation
    assert m["p99_ttft_ms"] == pytest.approx(396)
    assert m["mean_tpot_ms"] == pytest.approx((200 / 3 + 100) / 2)
    assert m["mean_itl_ms"] == pytest.approx(75)
    assert m["median_itl_ms"] == pytest.approx(75)
    assert m["p99_itl_ms"] == pytest.approx(100)
    assert m["mean_e2el_ms"] == pytest.approx(1000 / 3)
    assert m["std_e2el_ms"] == pytest.approx(math.sqrt(((300 - 1000 / 3) ** 2 + (500 - 1000 / 3) ** 2
                                                        + (200 - 1000 / 3) ** 2) / 3))
    # SLO: a (TTFT 100 <= 250, TPOT 66.7 <= 80) and c (TTFT 200, no TPOT) meet it; b misses TTFT; d failed
    assert m["request_goodput"] == pytest.approx(1.0)
    assert m["goodput_fraction"] == pytest.approx(0.5)
    assert m["errors"] == {"HTTP 400: too long": 1}
    # a looser SLO (TTFT <= 500, TPOT <= 100): b now meets it too (TPOT exactly 100)
    assert m["goodput_at"] == {"ttft<=250ms,tpot<=80ms": pytest.approx(1.0), "ttft<=500ms,tpot<=100ms": pytest.approx(1.5)}
    assert m["prefix_cache"]["hit_ratio"] == 0.25


def test_tpot_slo_alone_can_fail_a_request():
    a = _records()[0]
    assert SLO(ttft_ms=1000, tpot_ms=70).met(a) and not SLO(ttft_ms=1000, tpot_ms=60).met(a)


def test_report_files(tmp_path):
    recs = _records()
    m = compute_metrics(recs, 2.0, SLO())
    runs = [{"label": "x", "config": "x", "rate": 1.0, "metrics": m},
            {"label": "x @2x", "config": "x", "rate": 2.0, "metrics": m}]
    paths = write_report(tmp_path, runs, {"title": "t", "workload": {"name": "w"}}, {"x": recs, "x @2x": recs})
    data = json.loads(paths["json"].read_text())
    assert data["runs"][0]["metrics"]["completed"] == 3 and len(data["requests"]["x"]) == 4
    table = paths["markdown"].read_text()
    assert "| x |" in table and "TTFT p99" in table
    for key in ("ttft_cdf", "comparison", "goodput_vs_rate"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown_table(runs).count("\n") == 3
    again = rescore(paths["json"], SLO(ttft_ms=250, tpot_ms=80), parse_slos("500/100"), tmp_path / "re")
    rescored = json.loads(again["json"].read_text())["runs"][0]["metrics"]
    assert rescored["request_goodput"] == pytest.approx(1.0)  # a and c in 2 s; see the hand-computed test
    assert "goodput ttft<=500ms,tpot<=100ms" in again["markdown"].read_text()


def test_bad_slo_text_is_a_clear_error():
    with pytest.raises(ValueError, match="TTFT_MS/TPOT_MS"):
        parse_slos("5000")
    assert parse_slos("") == []


def test_duration_must_be_positive():
    with pytest.raises(ValueError):
        compute_metrics(_records(), 0.0, SLO())
