"""Benchmark reports: runs' metrics (disagg/workload/metrics.py) written as result.json (field names follow
`vllm bench serve` result files), a markdown table and PNG plots; shared by the simulator and the bench harness."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from disagg.workload.metrics import RequestRecord

# ---------------------------------------------------------------------- outputs
_TABLE_COLUMNS = [
    ("completed", "done", "{:d}"),
    ("failed", "errors", "{:d}"),
    ("request_throughput", "req/s", "{:.3f}"),
    ("output_throughput", "out tok/s", "{:.1f}"),
    ("request_goodput", "goodput req/s", "{:.3f}"),
    ("goodput_fraction", "SLO met", "{:.0%}"),
    ("mean_ttft_ms", "TTFT mean", "{:,.0f}"),
    ("median_ttft_ms", "TTFT p50", "{:,.0f}"),
    ("p90_ttft_ms", "TTFT p90", "{:,.0f}"),
    ("p99_ttft_ms", "TTFT p99", "{:,.0f}"),
    ("mean_tpot_ms", "TPOT mean", "{:,.1f}"),
    ("p99_tpot_ms", "TPOT p99", "{:,.1f}"),
    ("mean_itl_ms", "ITL mean", "{:,.1f}"),
    ("p99_itl_ms", "ITL p99", "{:,.1f}"),
    ("mean_e2el_ms", "E2E mean", "{:,.0f}"),
    ("p99_e2el_ms", "E2E p99", "{:,.0f}"),
]


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """One row per run: each run is {"label": str, "metrics": compute_metrics(...)}; times in ms."""
    extra = [k for k in (runs[0]["metrics"].get("goodput_at") or {})][1:] if runs else []
    header = (
        ["run"]
        + [title for _, title, _ in _TABLE_COLUMNS]
        + ["prefix hit (metrics)", "cached (usage)"]
        + [f"goodput {k}" for k in extra]
    )
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for run in runs:
        m = run["metrics"]
        cells = [run["label"]]
        for key, _, fmt in _TABLE_COLUMNS:
            v = m.get(key)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        hit = (m.get("prefix_cache") or {}).get("hit_ratio")
        cells.append("-" if hit is None else f"{hit:.1%}")
        cached = m.get("usage_cached_ratio")
        cells.append("-" if cached is None else f"{cached:.1%}")
        cells.extend(f"{m['goodput_at'][k]:.3f}" for k in extra)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    runs: list[dict[str, Any]],
    meta: dict[str, Any],
    records: dict[str, list[RequestRecord]] | None = None,
) -> dict[str, Path]:
    """result.json, report.md and plots under out_dir; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "result.json", "markdown": out / "report.md"}
    payload = {**meta, "runs": runs}
    if records:
        payload["requests"] = {label: [asdict(r) for r in recs] for label, recs in records.items()}
    paths["json"].write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    slo = runs[0]["metrics"]["slo"] if runs else {}
    text = [
        f"# {meta.get('title', 'Benchmark report')}",
        "",
        f"SLOs: TTFT <= {slo.get('ttft_ms')} ms, TPOT <= {slo.get('tpot_ms')} ms. Times in ms.",
        "",
        markdown_table(runs),
        "",
    ]
    per_model = [
        {"label": f"{run['label']} / {model}", "metrics": m}
        for run in runs
        for model, m in (run["metrics"].get("models") or {}).items()
    ]
    if per_model:
        text += ["Per model (over the run's duration):", "", markdown_table(per_model), ""]
    for key in ("workload", "scale", "settings"):
        if key in meta:
            text.append(f"- {key}: `{json.dumps(meta[key], default=_jsonable)}`")
    paths["markdown"].write_text("\n".join(text) + "\n")
    from disagg.workload.plots import plot_comparison, plot_goodput_vs_rate, plot_ttft_cdf

    if records:
        paths["ttft_cdf"] = plot_ttft_cdf(records, out / "ttft_cdf.png")
    paths["comparison"] = plot_comparison(runs, out / "comparison.png")
    if any("rate" in run for run in runs):
        paths["goodput_vs_rate"] = plot_goodput_vs_rate(runs, out / "goodput_vs_rate.png")
    return paths


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__dict__"):
        return vars(x)
    return str(x)
