"""Re-score a saved benchmark result under other SLOs (`python -m bench.report`): recomputes every run's metrics
from its per-request records and writes the report again."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from disagg.options import add_options, from_options
from disagg.workload.metrics import SLO, RequestRecord, compute_metrics, parse_slos
from disagg.workload.report import write_report


@dataclass
class ReportOptions:
    """Goodput reported at more SLOs than the main one (every CLI that writes a report)."""

    extra_slos: str = field(default="5000/500", metadata={"help": "more TTFT_MS/TPOT_MS pairs to report goodput at"})


@dataclass
class RescoreOptions:
    result: str = field(metadata={"positional": True, "help": "a saved result.json"})
    out: str = field(metadata={"help": "directory the new report goes to"})


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
    add_options(parser, RescoreOptions, only=("result",))
    add_options(parser, SLO, prefix="slo-")
    add_options(parser, ReportOptions)
    add_options(parser, RescoreOptions, only=("out",))
    args = parser.parse_args(argv)
    paths = rescore(args.result, from_options(SLO, args, prefix="slo-"), parse_slos(args.extra_slos), args.out)
    print(paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
