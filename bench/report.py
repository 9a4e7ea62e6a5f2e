"""Benchmark metrics and reports: per-request records -> latency percentiles, throughput, goodput under SLOs;
written as JSON (field names follow `vllm bench serve` result files), a markdown table and PNG plots."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import mean, percentile

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One replayed request; times in seconds, `start_s` relative to the start of the run."""

    index: int
    prompt_tokens: int
    max_tokens: int
    start_s: float
    session_id: str | None = None
    turn: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    request_id: str | None = None  # the server's id (from the stream's chunks)
    text: str | None = None  # the output text, when the replay records it (chaos runs compare outputs)
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server reports it
    refused_s: float | None = None  # when refused (429): how long after start_s the refusal came
    refusal_code: str | None = None  # the 429's error code (queue_full, shed, deadline, expired)

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for a single-token output)."""
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 2000.0
    tpot_ms: float = 200.0

    def met(self, r: RequestRecord) -> bool:
        if not r.ok or r.ttft_s is None or r.ttft_s * 1000 > self.ttft_ms:
            return False
        tpot = r.tpot_s
        return tpot is None or tpot * 1000 <= self.tpot_ms


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    out = {f"mean_{name}_ms": mean(ms), f"median_{name}_ms": percentile(ms, 50),
           f"std_{name}_ms": _std(ms)}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = percentile(ms, p)
    return out


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0 if values else float("nan")
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def parse_slos(text: str | None) -> list[SLO]:
    """'5000/500,10000/1000' -> [SLO(5000, 500), SLO(10000, 1000)] (TTFT ms / TPOT ms)."""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        try:
            ttft, tpot = part.split("/")
            out.append(SLO(float(ttft), float(tpot)))
        except ValueError as exc:
            raise ValueError(f"bad SLO {part!r}: expected TTFT_MS/TPOT_MS, e.g. 5000/500") from exc
    return out


def slo_key(slo: SLO) -> str:
    return f"ttft<={slo.ttft_ms:g}ms,tpot<={slo.tpot_ms:g}ms"


def compute_metrics(records: list[RequestRecord], duration_s: float, slo: SLO,
                    prefix_cache: dict[str, float] | None = None,
                    extra_slos: list[SLO] | None = None) -> dict[str, Any]:
    """Aggregate figures over a run.  `duration_s` is wall time from the first send to the last completion.
    Goodput is reported for `slo` and, under "goodput_at", for each of `extra_slos` too."""
    if duration_s <= 0:
        raise ValueError("duration_s must be positive")
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    good = [r for r in done if slo.met(r)]
    errors: dict[str, int] = {}
    for r in failed:
        key = (r.error or "no response")[:120]
        errors[key] = errors.get(key, 0) + 1
    metrics: dict[str, Any] = {
        "duration": duration_s, "num_prompts": len(records), "completed": len(done), "failed": len(failed),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration_s, "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "request_goodput": len(good) / duration_s, "goodput_fraction": len(good) / len(records) if records else 0.0,
        "slo": asdict(slo), "errors": errors,
        "goodput_at": {slo_key(x): sum(x.met(r) for r in done) / duration_s for x in [slo, *(extra_slos or [])]},
    }
    metrics.update(_stats("ttft", [r.ttft_s for r in done if r.ttft_s is not None]))
    metrics.update(_stats("tpot", [t for r in done if (t := r.tpot_s) is not None]))
    metrics.update(_stats("itl", [gap for r in done for gap in r.itl_s]))
    metrics.update(_stats("e2el", [r.e2e_s for r in done]))
    if prefix_cache:
        metrics["prefix_cache"] = prefix_cache
    reported = [r for r in done if r.cached_tokens is not None]
    if reported:  # the OpenAI usage field: comparable across servers that fill it (ours, vLLM's)
        metrics["usage_cached_ratio"] = sum(r.cached_tokens or 0 for r in reported) / max(
            1, sum(r.prompt_tokens for r in reported))
    return metrics


# ---------------------------------------------------------------------- outputs
_TABLE_COLUMNS = [("completed", "done", "{:d}"), ("failed", "errors", "{:d}"),
                  ("request_throughput", "req/s", "{:.3f}"), ("output_throughput", "out tok/s", "{:.1f}"),
                  ("request_goodput", "goodput req/s", "{:.3f}"), ("goodput_fraction", "SLO met", "{:.0%}"),
                  ("mean_ttft_ms", "TTFT mean", "{:,.0f}"), ("median_ttft_ms", "TTFT p50", "{:,.0f}"),
                  ("p90_ttft_ms", "TTFT p90", "{:,.0f}"), ("p99_ttft_ms", "TTFT p99", "{:,.0f}"),
                  ("mean_tpot_ms", "TPOT mean", "{:,.1f}"), ("p99_tpot_ms", "TPOT p99", "{:,.1f}"),
                  ("mean_itl_ms", "ITL mean", "{:,.1f}"), ("p99_itl_ms", "ITL p99", "{:,.1f}"),
                  ("mean_e2el_ms", "E2E mean", "{:,.0f}"), ("p99_e2el_ms", "E2E p99", "{:,.0f}")]


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """One row per run: each run is {"label": str, "metrics": compute_metrics(...)}; times in ms."""
    extra = [k for k in (runs[0]["metrics"].get("goodput_at") or {})][1:] if runs else []
    header = (["run"] + [title for _, title, _ in _TABLE_COLUMNS] + ["prefix hit (metrics)", "cached (usage)"]
              + [f"goodput {k}" for k in extra])
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


def write_report(out_dir: str | Path, runs: list[dict[str, Any]], meta: dict[str, Any],
                 records: dict[str, list[RequestRecord]] | None = None) -> dict[str, Path]:
    """result.json, report.md and plots under out_dir; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "result.json", "markdown": out / "report.md"}
    payload = {**meta, "runs": runs}
    if records:
        payload["requests"] = {label: [asdict(r) for r in recs] for label, recs in records.items()}
    paths["json"].write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    slo = runs[0]["metrics"]["slo"] if runs else {}
    text = [f"# {meta.get('title', 'Benchmark report')}", "",
            f"SLOs: TTFT <= {slo.get('ttft_ms')} ms, TPOT <= {slo.get('tpot_ms')} ms. Times in ms.", "",
            markdown_table(runs), ""]
    for key in ("workload", "scale", "settings"):
        if key in meta:
            text.append(f"- {key}: `{json.dumps(meta[key], default=_jsonable)}`")
    paths["markdown"].write_text("\n".join(text) + "\n")
    from bench.plots import plot_comparison, plot_goodput_vs_rate, plot_ttft_cdf
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


def rescore(result_json: str | Path, slo: SLO, extra_slos: list[SLO], out_dir: str | Path) -> dict[str, Path]:
    """Recompute every run of a saved result.json under other SLOs (from its per-request records)."""
    data = json.loads(Path(result_json).read_text())
    records = {label: [RequestRecord(**r) for r in recs] for label, recs in (data.get("requests") or {}).items()}
    if not records:
        raise ValueError(f"{result_json} has no per-request records to rescore")
    runs = []
    for run in data["runs"]:
        old = run["metrics"]
        m = compute_metrics(records[run["label"]], old["duration"], slo, old.get("prefix_cache"), extra_slos)
        m.update({k: v for k, v in old.items() if k not in m})  # not_sent, sim counters
        runs.append({**run, "metrics": m})
    meta = {k: v for k, v in data.items() if k not in ("runs", "requests")}
    return write_report(out_dir, runs, meta, records)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description="re-score a saved result.json")
    parser.add_argument("result")
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=200.0)
    parser.add_argument("--extra-slos", default="5000/500")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    paths = rescore(args.result, SLO(args.slo_ttft_ms, args.slo_tpot_ms), parse_slos(args.extra_slos), args.out)
    print(paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
