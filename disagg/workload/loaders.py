"""Trace files, in the formats users bring (`FORMATS`; detected from the extension and the CSV header):

- Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids [, session_id, turn, think_time_ms];
- Azure LLM inference traces (2023 and 2024 releases): CSV `TIMESTAMP,ContextTokens,GeneratedTokens` with
  TIMESTAMP a date-time string (`2023-11-16 18:15:46.6805900`, `2024-05-10 00:00:00.009930+00:00`);
- BurstGPT: CSV `Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`, Timestamp in seconds
  (rows with 0 response tokens are failed requests and are skipped);
- a generic CSV of (timestamp ms, input tokens, output tokens), with a header or positional.

Times become milliseconds from the first request.  CSV traces have no hash_ids: every prompt is unique (no prefix
sharing is claimed).
"""

from __future__ import annotations

import csv
import enum
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from disagg.workload.record import TraceRequest

TRACES_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces"


class TraceFormat(str, enum.Enum):
    MOONCAKE = "mooncake-jsonl"
    AZURE = "azure-csv"
    BURSTGPT = "burstgpt-csv"
    CSV = "csv"


FORMATS = {
    TraceFormat.MOONCAKE: ".jsonl with timestamp (ms), input_length, output_length[, hash_ids, session_id, ...]",
    TraceFormat.AZURE: ".csv TIMESTAMP (date-time), ContextTokens, GeneratedTokens (Azure LLM traces 2023/2024)",
    TraceFormat.BURSTGPT: ".csv Timestamp (s), Model, Request tokens, Response tokens, ... (BurstGPT)",
    TraceFormat.CSV: ".csv timestamp (ms), input_tokens, output_tokens (header optional)",
}
# generic CSV header spellings accepted for each field (first match wins); without a header, positional
_CSV_FIELDS = {
    "timestamp": ("timestamp", "timestamp_ms", "time", "arrival_time"),
    "input": ("input_tokens", "input_length", "prompt_tokens", "context_tokens", "input"),
    "output": ("output_tokens", "output_length", "generated_tokens", "completion_tokens", "output"),
}
_AZURE = ("timestamp", "contexttokens", "generatedtokens")
_BURSTGPT = ("timestamp", "request tokens", "response tokens")


class UnknownTraceFormat(ValueError):
    def __init__(self, path: Path, why: str) -> None:
        listed = "\n".join(f"  {f.value}: {d}" for f, d in FORMATS.items())
        super().__init__(f"{path}: {why}; supported trace formats:\n{listed}")


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
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return load_csv(p, limit)
    if suffix in (".jsonl", ".json"):
        return load_jsonl(p, limit)
    raise UnknownTraceFormat(p, f"unknown extension {p.suffix!r}")


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
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                if not out:  # the very first record does not fit: not a Mooncake trace at all
                    raise UnknownTraceFormat(Path(path), f"line {lineno} is not a Mooncake record ({exc})") from exc
                raise ValueError(f"{path}:{lineno}: {exc}") from exc
    return out


def write_jsonl(requests: list[TraceRequest], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w") as f:
        for r in requests:
            f.write(json.dumps(r.to_json()) + "\n")


def detect_csv(header: list[str]) -> TraceFormat:
    names = [c.strip().lower() for c in header]
    if all(n in names for n in _BURSTGPT):
        return TraceFormat.BURSTGPT
    if all(n in names for n in _AZURE):
        return TraceFormat.AZURE
    return TraceFormat.CSV


def load_csv(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    fmt = detect_csv(rows[0])
    if fmt is TraceFormat.BURSTGPT:
        cols = {k: header.index(n) for k, n in zip(("timestamp", "input", "output"), _BURSTGPT)}
        rows = rows[1:]
    elif fmt is TraceFormat.AZURE:
        cols = {k: header.index(n) for k, n in zip(("timestamp", "input", "output"), _AZURE)}
        rows = rows[1:]
    elif header and not _is_number(header[0]):  # a header row names its columns; data starts with a time
        cols = {}
        for key, names in _CSV_FIELDS.items():
            found = next((header.index(n) for n in names if n in header), None)
            if found is None:
                raise UnknownTraceFormat(path, f"CSV header {rows[0]} has no {key} column")
            cols[key] = found
        rows = rows[1:]
    else:
        cols = {"timestamp": 0, "input": 1, "output": 2}
    parsers: dict[TraceFormat, Callable[[str], float]] = {TraceFormat.AZURE: _datetime_s, TraceFormat.BURSTGPT: float}
    to_ms = parsers.get(fmt)
    out: list[TraceRequest] = []
    origin = None
    for lineno, row in enumerate(rows, 2):
        if limit is not None and len(out) >= limit:
            break
        if not any(c.strip() for c in row):
            continue
        try:
            raw = row[cols["timestamp"]].strip()
            t = to_ms(raw) * 1000.0 if to_ms is not None else float(raw)
            n_in, n_out = int(row[cols["input"]]), int(row[cols["output"]])
        except (ValueError, IndexError) as exc:
            raise ValueError(f"{path}:{lineno}: bad row {row}: {exc}") from exc
        if fmt is TraceFormat.BURSTGPT and n_out == 0:
            continue  # a failed request in BurstGPT's log
        if to_ms is not None:
            origin = t if origin is None else origin
            t -= origin
        out.append(TraceRequest(t, n_in, n_out))
    return out


def _datetime_s(text: str) -> float:
    """Seconds since the epoch of an Azure TIMESTAMP (naive times are taken as UTC)."""
    if "." in text:  # Azure 2023 writes 7 fractional digits; Python parses at most 6
        head, _, tail = text.partition(".")
        digits = "".join(c for c in tail if c.isdigit())
        zone = tail[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


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
