"""What a replay reads from a server's /metrics before and after a run (ours: disagg:*, vLLM's: vllm:*): prefix-cache
tokens, the router's staleness histogram, and its placement predictions and routes by mode.  A server without
/metrics (llama-cpp-python's), or one that refuses the key (/metrics needs the metrics scope), gives None."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.metrics_core import Metric


async def _families(client: httpx.AsyncClient) -> list[Metric] | None:
    """The server's metric families, or None: no /metrics (llama-cpp-python's), a refused key, no answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return list(text_string_to_metric_families(resp.text))


async def scrape_prefix_cache(client: httpx.AsyncClient) -> dict[str, float] | None:
    """Prefix-cache query/hit token counters from /metrics (ours: disagg:*, vLLM: vllm:*), summed."""
    families = await _families(client)
    if families is None:
        return None
    totals = {"queries": 0.0, "hits": 0.0}
    found = False
    for family in families:
        for key in totals:
            if family.name.endswith(f"prefix_cache_{key}"):
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        totals[key] += sample.value
                        found = True
    return totals if found else None


async def scrape_staleness(client: httpx.AsyncClient) -> dict[float, float] | None:
    """Cumulative bucket counts of the router's staleness histogram (predicted - found cached tokens)."""
    families = await _families(client)
    if families is None:
        return None
    buckets = {}
    for family in families:
        if family.name == "disagg:route_staleness_tokens":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] = sample.value
    return buckets or None


def staleness_summary(before: dict[float, float] | None, after: dict[float, float] | None) -> dict[str, Any] | None:
    """The run's staleness distribution from two histogram scrapes: share of requests whose prediction was exact,
    over-predicted (the index promised more cached tokens than the worker found) or under-predicted, and the
    bucket counts."""
    if not after:
        return None
    diff = {le: after[le] - (before or {}).get(le, 0.0) for le in sorted(after)}
    total = diff[float("inf")]
    if not total:
        return None
    at_or_below = lambda le: diff.get(le, 0.0)  # noqa: E731 (cumulative counts)
    under = at_or_below(-1.0)
    exact = at_or_below(0.0) - under
    return {
        "requests": total,
        "exact": exact / total,
        "under_predicted": under / total,
        "over_predicted": (total - at_or_below(0.0)) / total,
        "cumulative_buckets": diff,
    }


async def scrape_routing(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """The router's TTFT predictions (count, summed relative error) and its routes by mode (local, remote,
    flexible, ...), cumulative."""
    families = await _families(client)
    if families is None:
        return None
    out: dict[str, Any] = {"predictions": 0.0, "prediction_error": 0.0, "within_20pct": 0.0, "routes": {}}
    found = False
    for family in families:
        for sample in family.samples:  # by the sample's name: a family's is cut of `_total` only when typed
            if sample.name == "disagg:ttft_predictions_total":
                out["predictions"], found = sample.value, True
            elif sample.name == "disagg:ttft_prediction_error_total":
                out["prediction_error"], found = sample.value, True
            elif sample.name == "disagg:ttft_prediction_relative_error_bucket" and sample.labels.get("le") == "0.2":
                out["within_20pct"] = sample.value
            elif sample.name == "disagg:routed_requests_total":
                mode = sample.labels.get("mode", "")
                out["routes"][mode] = out["routes"].get(mode, 0.0) + sample.value
                found = True
    return out if found else None


def routing_summary(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's share of the counters: TTFT predictions, their mean relative error and the share within 20% (the
    cost model's accuracy, issue 27's goal), and requests routed per mode (how often flexible workers took one)."""
    if after is None:
        return None
    before = before or {"predictions": 0.0, "prediction_error": 0.0, "within_20pct": 0.0, "routes": {}}
    n = after["predictions"] - before["predictions"]
    within = after.get("within_20pct", 0.0) - before.get("within_20pct", 0.0)
    routes = {mode: count - before["routes"].get(mode, 0.0) for mode, count in after["routes"].items()}
    return {
        "ttft_predictions": n,
        "ttft_prediction_error_mean": (after["prediction_error"] - before["prediction_error"]) / n if n else None,
        # the median error is <= 20% exactly when this share is >= 0.5
        "ttft_predictions_within_20pct": within / n if n else None,
        "routes": {mode: count for mode, count in routes.items() if count},
    }
