"""The bench harness end to end on real local clusters it starts and ends itself (Ray actors, router HTTP endpoint,
NIXL): a short scaled Mooncake replay through `disagg bench compare` (two configurations, zero errors, report +
plots)."""
import json

import ray

from disagg.cli import main as cli_main


def test_compare_replays_a_scaled_trace_with_zero_errors_and_writes_report(no_ray, tmp_path, smollm_dir):
    out = tmp_path / "cmp"
    rc = cli_main(["bench", "compare", "--trace", "mooncake_conversation_trace.jsonl", "--limit", "24",
                   "--configs", "agg-kv=0x1:kv,disagg-kv=1x1:kv", "--time-scale", "20", "--max-output-tokens", "4",
                   "--max-input-tokens", "256", "--kv-cache-mb", "96", "--max-model-len", "1024", "--model", str(smollm_dir),
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    assert not ray.is_initialized()  # the harness cleaned up after itself
    result = json.loads((out / "result.json").read_text())
    assert [r["label"] for r in result["runs"]] == ["agg-kv", "disagg-kv"]
    for run in result["runs"]:
        m = run["metrics"]
        assert (m["completed"], m["failed"], m["not_sent"]) == (24, 0, 0), m["errors"]
        assert m["total_output_tokens"] == sum(r["max_tokens"] for r in result["requests"][run["label"]])
        assert m["mean_ttft_ms"] > 0 and m["p99_e2el_ms"] >= m["median_e2el_ms"]
        # the trace's first requests share hash_id 0 (one 16-token block each): the router's metrics see hits
        assert m["prefix_cache"]["query_tokens"] > 0 and m["prefix_cache"]["hit_tokens"] > 0
    assert result["scale"]["length_factor"] == 1 / 32 and result["scale"]["time_scale"] == 20
    assert "| disagg-kv |" in (out / "report.md").read_text()
    for png in ("ttft_cdf.png", "comparison.png", "goodput_vs_rate.png"):
        assert (out / png).stat().st_size > 1000
