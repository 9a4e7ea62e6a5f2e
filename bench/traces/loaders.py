"""Trace files: Mooncake-format JSONL (timestamp ms, input_length, output_length, hash_ids [, session_id, turn,
think_time_ms]) and a generic CSV of (timestamp, input tokens, output tokens)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from bench.traces.record import TraceRequest

TRACES_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces"
# CSV header spellings accepted for each field (first match wins); without a header the columns are positional
_CSV_FIELDS = {
    "timestamp": ("timestamp", "timestamp_ms", "time", "arrival_time"),
    "input": ("input_tokens", "input_length", "prompt_tokens", "context_tokens", "input"),
    "output": ("output_tokens", "output_length", "generated_tokens", "completion_tokens", "output"),
}


def resolve(path: str | Path) -> Path:
    """A trace path as given, or a file name inside the shared traces folder."""
    p = Path(path)
    if p.exists():
        return p
    if (TRACES_DIR / p).exists():
        return TRACES_DIR / p
    raise FileNotFoundError(f"no trace {path!s} (looked in . and {TRACES_DIR})")


def load(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    p = resolve(path)
    return load_csv(p, limit) if p.suffix.lower() == ".csv" else load_jsonl(p, limit)


def load_jsonl(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                out.append(TraceRequest.from_json(json.loads(line)))
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from exc
    return out


def write_jsonl(requests: list[TraceRequest], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w") as f:
        for r in requests:
            f.write(json.dumps(r.to_json()) + "\n")


def load_csv(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Timestamps in milliseconds.  No hash_ids: every prompt is unique (no prefix sharing is claimed)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    if header and not _is_number(header[0]):  # a header row names its columns; data starts with a time
        cols = {}
        for key, names in _CSV_FIELDS.items():
            found = next((header.index(n) for n in names if n in header), None)
            if found is None:
                raise ValueError(f"{path}: CSV header {rows[0]} has no {key} column (one of {names})")
            cols[key] = found
        rows = rows[1:]
    else:
        cols = {"timestamp": 0, "input": 1, "output": 2}
    out = []
    for lineno, row in enumerate(rows, 2):
        if limit is not None and len(out) >= limit:
            break
        if not any(c.strip() for c in row):
            continue
        try:
            out.append(TraceRequest(float(row[cols["timestamp"]]), int(row[cols["input"]]),
                                    int(row[cols["output"]])))
        except (ValueError, IndexError) as exc:
            raise ValueError(f"{path}:{lineno}: bad row {row}: {exc}") from exc
    return out


def write_csv(requests: list[TraceRequest], path: str | Path) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "input_tokens", "output_tokens"])
        for r in requests:
            w.writerow([_num(r.timestamp_ms), r.input_length, r.output_length])


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
