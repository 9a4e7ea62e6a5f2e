"""Helpers shared by benchmarks: table + JSON output (percentiles and means: disagg/workload/metrics.py)."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console(width=160).print(table)


def emit(result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


class BaselineProcess:
    """A peer's in-process benchmark (bench/vllm_baseline.py, bench/llamacpp_baseline.py) in its own virtualenv,
    kept loaded so its runs interleave with ours: it prints `<TAG>_READY` once loaded, then reads one JSON list of
    prompts per line and answers `<TAG>_RESULT <json>`."""

    def __init__(self, tag: str, command: list[str], env: dict[str, str] | None = None) -> None:
        self.tag = tag
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._expect(f"{tag}_READY")

    def _expect(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"the {self.tag} baseline exited with {self.proc.wait()}")

    def run(self, prompts: list[list[int]]) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(prompts) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect(f"{self.tag}_RESULT"))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def median_range(values: list[float]) -> str:
    """'median (min-max)', three decimals: how the benches print a figure over repeats."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def planner_verdict(arms: dict[str, Any]) -> dict[str, Any]:
    """One repeat's arms (each with its `good` count; the dynamic one named "planner") with the best static arm
    and the planner's ratio to it (both None for a partial run without a static arm or the planner)."""
    static = {arm: f["good"] for arm, f in arms.items() if arm != "planner"}
    if not static or "planner" not in arms:
        return {"arms": arms, "best_static": None, "ratio": None}
    best = max(static, key=lambda k: static[k])
    return {"arms": arms, "best_static": best, "ratio": arms["planner"]["good"] / max(static[best], 1)}
