"""Per-stage latency breakdown from the spans a traced run wrote (JSON lines, `--trace-dir`): for each request, how
long it spent queued in the router, being routed, queued and computing its prefill, moving KV, queued and
computing its decode - joined with the client's own end-to-end time.  What the named stages leave of E2E is
reported, not absorbed: "unaccounted" = E2E - sum(named stages), split into "transit" (the router's span minus the
named stages: RPCs, tokenization, SSE writes, waits for an engine thread that no stage covers) and "other" (E2E
minus the router's span: the client <-> router HTTP hop).  "named stages within 2% of E2E" is the share of
requests whose named stages alone come within 2% of the client's E2E: nothing derived from E2E is in that sum."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from disagg.workload.metrics import RequestRecord, percentile

STAGES = (
    "router.queue",
    "router.route",
    "prefill.queue",
    "prefill.compute",
    "kv.transfer",
    "decode.queue",
    "decode.compute",
)
# a request the router prefilled on its decode worker (local prefill) has no transfer and no separate decode queue
LOCAL_STAGES = frozenset(STAGES) - {"kv.transfer", "decode.queue"}


def load_spans(directory: str | Path) -> list[dict[str, Any]]:
    spans = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


def per_request(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """request id -> {"trace_id", "root": span, "stages": {stage: seconds}, "spans": [...]}."""
    by_trace: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        by_trace[span["trace_id"]].append(span)
    out = {}
    for trace_id, group in by_trace.items():
        roots = [s for s in group if "gen_ai.response.id" in s["attributes"]]
        if not roots:
            continue
        root = roots[0]
        stages = {name: 0.0 for name in STAGES}
        for s in group:
            if s["name"] in stages:
                stages[s["name"]] += (s["end_ns"] - s["start_ns"]) / 1e9
        present = frozenset(s["name"] for s in group if s["name"] in STAGES)
        routes = [s for s in group if s["name"] == "router.route"]
        remote = bool(routes) and bool(routes[-1]["attributes"].get("disagg.prefill_worker"))
        root_s = (root["end_ns"] - root["start_ns"]) / 1e9
        out[root["attributes"]["gen_ai.response.id"]] = {
            "trace_id": trace_id,
            "root": root,
            "root_s": root_s,
            "stages": stages,
            "spans": group,
            "present": present,
            "remote": remote,
        }
    return out


def breakdown(records: list[RequestRecord], spans: list[dict[str, Any]]) -> dict[str, Any]:
    """p50 / p99 of every named stage over the completed requests that have a trace, plus what they leave of the
    client's E2E ("unaccounted", split into "transit" inside the router's span and "other" outside it), the share
    of requests whose named stages alone come within 2% of their E2E, and of those whose one
    trace holds every stage of the path the router chose: all of them for a remote prefill, all but
    kv.transfer and decode.queue for a local one (the router prefills locally when it is cheaper)."""
    traced = per_request(spans)
    rows: dict[str, list[float]] = defaultdict(list)
    within, matched, complete, remote = 0, 0, 0, 0
    for r in records:
        t = traced.get(r.request_id or "")
        if not r.ok or r.e2e_s is None or t is None:
            continue
        matched += 1
        remote += t["remote"]
        complete += t["present"] >= (frozenset(STAGES) if t["remote"] else LOCAL_STAGES)
        named = sum(t["stages"].values())
        for name, seconds in t["stages"].items():
            rows[name].append(seconds)
        unaccounted = r.e2e_s - named
        rows["unaccounted"].append(unaccounted)
        rows["transit"].append(t["root_s"] - named)
        rows["other"].append(r.e2e_s - t["root_s"])
        rows["e2e"].append(r.e2e_s)
        within += abs(unaccounted) <= 0.02 * r.e2e_s
    table = {
        name: {
            "p50_ms": percentile(v, 50) * 1000,
            "p99_ms": percentile(v, 99) * 1000,
            "mean_ms": sum(v) / len(v) * 1000 if v else float("nan"),
        }
        for name, v in rows.items()
    }
    return {
        "requests": len(records),
        "traced": matched,
        "stages": table,
        "named_within_2pct_of_e2e": within / matched if matched else float("nan"),
        "every_stage": complete / matched if matched else float("nan"),
        "remote_prefill": remote / matched if matched else float("nan"),
    }


def markdown(label: str, result: dict[str, Any]) -> str:
    head = "| stage | mean ms | p50 ms | p99 ms |\n|---|---:|---:|---:|"
    lines = [
        f"**{label}**: {result['traced']} of {result['requests']} requests traced, "
        f"{result.get('every_stage', float('nan')):.0%} with every stage of their path in one trace "
        f"({result.get('remote_prefill', float('nan')):.0%} prefilled remotely); the named stages alone come "
        f"within 2% of the client's E2E for {result['named_within_2pct_of_e2e']:.0%}; unaccounted = E2E - "
        "named stages = transit (inside the router's span) + other (the HTTP hop)",
        "",
        head,
    ]
    for name in (*STAGES, "unaccounted", "transit", "other", "e2e"):
        s = result["stages"].get(name)
        if s is not None:
            lines.append(f"| {name} | {s['mean_ms']:,.1f} | {s['p50_ms']:,.1f} | {s['p99_ms']:,.1f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Stacked bars of the mean time per stage, one bar per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(labels)
    for name in (*STAGES, "transit", "other"):
        values = [results[lab]["stages"].get(name, {}).get("mean_ms", 0.0) for lab in labels]
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("mean time per request (ms)")
    ax.set_title("where a request's time goes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
