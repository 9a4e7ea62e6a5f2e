"""PNG plots for bench reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_ttft_cdf(records: dict[str, list[Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, recs in records.items():
        ttfts = sorted(r.ttft_s * 1000 for r in recs if r.ok and r.ttft_s is not None)
        if ttfts:
            ax.step(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_goodput_vs_rate(runs: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_config: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        if "rate" in run:
            by_config.setdefault(run.get("config", run["label"]), []).append(
                (run["rate"], run["metrics"]["request_goodput"])
            )
    for config, points in by_config.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=config)
    ax.set_xlabel("offered load (x trace rate)")
    ax.set_ylabel("goodput (requests/s within SLO)")
    ax.set_title("Goodput vs request rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(runs: list[dict[str, Any]], path: Path) -> Path:
    labels = [run["label"] for run in runs]
    panels = [
        ("request_goodput", "goodput (req/s)"),
        ("output_throughput", "output tok/s"),
        ("p90_ttft_ms", "TTFT p90 (ms)"),
        ("mean_tpot_ms", "TPOT mean (ms)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), max(3.5, 0.35 * len(labels) + 2)))
    for ax, (key, title) in zip(axes, panels):
        values = [run["metrics"].get(key) or 0.0 for run in runs]
        ax.barh(range(len(labels)), values, color="tab:blue")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if ax is axes[0] else [""] * len(labels), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
