"""A/B studies of the overload benchmark: repeated sweeps (medians with their range over interleaved passes, both
arms against one reference) and the rescore study."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

ARMS = ("admission", "no_admission")


def aggregate_sweeps(runs: dict[str, list[list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per arm and load: the median goodput over the repeats with its range (absolute req/s), and both arms
    divided by ONE reference: the no-admission arm's peak goodput (the median over repeats of each pass's best
    load), measured in the same run.  (Dividing each arm by its own peak made "holds 0.9 of peak" true by
    definition for whichever arm it described.)"""
    reference = statistics.median(max(r["goodput"] for r in rows) for rows in runs["no_admission"])
    out: dict[str, Any] = {
        "reference_goodput": reference,
        "reference": "no-admission peak goodput (median over repeats), same run",
    }
    for arm, passes in runs.items():
        table = []
        for i, row in enumerate(passes[0]):
            values = [p[i]["goodput"] for p in passes]
            median = statistics.median(values)
            table.append(
                {
                    "load": row["load"],
                    "goodput": median,
                    "goodput_min": min(values),
                    "goodput_max": max(values),
                    "goodput_vs_reference": median / reference if reference else float("nan"),
                    "passes": [p[i] for p in passes],
                }
            )
        out[arm] = table
    return out


def rescore_study(go, capacity: float, args: argparse.Namespace, slo: tuple[float, float]) -> dict[str, Any]:
    """Issue 11 item 4: with prompts that share prefixes, at 2x capacity, route a queued request when it leaves
    the queue (fresh index, only workers with room) vs when it arrives (and wait for that worker)."""
    from bench.overload import summarize  # the overload module imports this one

    out = {}
    for mode, rescore in (("rescore_on_dispatch", True), ("route_on_arrival", False)):
        stats: dict[str, float] = {}
        shots = go(
            [("default", 0, 2 * capacity)],
            args.duration,
            seed=3,
            rescore=rescore,
            prefixes=args.prefixes or 4 * args.simulate,
            stats=stats,
        )
        out[mode] = {**summarize(shots, args.duration, *slo), "hit_ratio": stats.get("hit_ratio")}
        print(f"[overload] rescore {mode}: {out[mode]}", flush=True)
    return out
