"""Re-score a saved benchmark result under other SLOs (`python -m bench.report`): recomputes every run's metrics
from its per-request records and writes the report again."""

from __future__ import annotations

import json
from pathlib import Path

from disagg.options import add_options, from_options
from disagg.workload.metrics import SLO, RequestRecord, compute_metrics, parse_slos
from disagg.workload.report import write_report


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
    add_options(parser, SLO, prefix="slo-")
    parser.add_argument("--extra-slos", default="5000/500")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    paths = rescore(args.result, from_options(SLO, args, prefix="slo-"), parse_slos(args.extra_slos), args.out)
    print(paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
