"""Serving metrics: per-request records (a replay's or the simulator's) -> latency percentiles, throughput, and
goodput under TTFT/TPOT SLOs.  Field names follow `vllm bench serve` result files; disagg/workload/report.py writes
them out."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


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
    model: str | None = None  # the model it asked for

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for a single-token output)."""
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    """The latency objectives goodput counts against; every CLI's --slo-ttft-ms / --slo-tpot-ms come from here
    (`add_options(parser, SLO, prefix="slo-")`)."""

    ttft_ms: float = field(default=2000.0, metadata={"help": "SLO: time to first token, ms"})
    tpot_ms: float = field(default=200.0, metadata={"help": "SLO: time per output token after the first, ms"})

    def met(self, r: RequestRecord) -> bool:
        if not r.ok or r.ttft_s is None or r.ttft_s * 1000 > self.ttft_ms:
            return False
        tpot = r.tpot_s
        return tpot is None or tpot * 1000 <= self.tpot_ms


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    out = {f"mean_{name}_ms": mean(ms), f"median_{name}_ms": percentile(ms, 50), f"std_{name}_ms": _std(ms)}
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


def compute_metrics(
    records: list[RequestRecord],
    duration_s: float,
    slo: SLO,
    prefix_cache: dict[str, float] | None = None,
    extra_slos: list[SLO] | None = None,
) -> dict[str, Any]:
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
        "duration": duration_s,
        "num_prompts": len(records),
        "completed": len(done),
        "failed": len(failed),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "request_goodput": len(good) / duration_s,
        "goodput_fraction": len(good) / len(records) if records else 0.0,
        "slo": asdict(slo),
        "errors": errors,
        "goodput_at": {slo_key(x): sum(x.met(r) for r in done) / duration_s for x in [slo, *(extra_slos or [])]},
    }
    metrics.update(_stats("ttft", [r.ttft_s for r in done if r.ttft_s is not None]))
    metrics.update(_stats("tpot", [t for r in done if (t := r.tpot_s) is not None]))
    metrics.update(_stats("itl", [gap for r in done for gap in r.itl_s]))
    metrics.update(_stats("e2el", [r.e2e_s for r in done if r.e2e_s is not None]))
    if prefix_cache:
        metrics["prefix_cache"] = prefix_cache
    models = sorted({r.model for r in records if r.model is not None})
    if len(models) > 1:  # per-model figures over the same run's duration
        metrics["models"] = {
            m: compute_metrics([r for r in records if r.model == m], duration_s, slo, None, extra_slos) for m in models
        }
    reported = [r for r in done if r.cached_tokens is not None]
    if reported:  # the OpenAI usage field: comparable across servers that fill it (ours, vLLM's)
        metrics["usage_cached_ratio"] = sum(r.cached_tokens or 0 for r in reported) / max(
            1, sum(r.prompt_tokens for r in reported)
        )
    return metrics
