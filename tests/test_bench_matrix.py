"""The disaggregation matrix's cells (bench/matrix.py): the arms at a worker count, each cell's arguments, and
the summary of the adaptive arm against the best aggregated and static arms (a cell where nothing met the SLO
says so instead of a ratio)."""
from pathlib import Path

import pytest

from bench.adaptive import summarize
from bench.matrix import MatrixOptions, cell_args, configs, markdown
from disagg.sim.spec import parse_configs


def test_the_arms_cover_aggregated_static_splits_and_the_adaptive_runtime():
    specs = {s.name: s for s in parse_configs(configs(16))}
    assert {n for n, s in specs.items() if s.num_prefill == 0 and not s.planner} == {"agg-rr", "agg-kv"}
    assert {(s.num_prefill, s.num_decode) for n, s in specs.items() if n.startswith("split-")} == {
        (4, 12), (8, 8), (12, 4)}
    for name, split in (("adaptive", (0, 16)), ("adaptive-split", (4, 12))):  # started aggregated, or from 1/4
        spec = specs[name]
        assert spec.adaptive and spec.planner and (spec.num_prefill, spec.num_decode) == split
    assert len(parse_configs(configs(2))) == 5  # 2 workers: one split (1x1) besides the two aggregated arms


def test_arms_picks_the_arms_a_cell_runs_and_refuses_a_name_it_does_not_know():
    """A policy change re-runs only the arms it can change (`--arms adaptive,adaptive-split`)."""
    assert [s.name for s in parse_configs(configs(16, only="adaptive,adaptive-split"))] == ["adaptive",
                                                                                           "adaptive-split"]
    args = cell_args(MatrixOptions(workers=16, arms="agg-kv"), "agent", "quarter", "loose", Path("/tmp/x"))
    assert args[args.index("--configs") + 1] == "agg-kv=0x16:kv"
    with pytest.raises(ValueError, match="no arm named split-9x9"):
        configs(16, only="adaptive,split-9x9")


def test_a_cell_passes_its_workload_lengths_and_slo_on():
    args = cell_args(MatrixOptions(workers=4, simulate=True), "agent", "quarter", "tpot-binds", Path("/tmp/x"))
    assert args[:2] == ["--agent", "coding_agent"] and "--sessions" in args and "--limit" not in args
    assert args[args.index("--block-tokens") + 1] == "128" and args[args.index("--slo-tpot-ms") + 1] == "100"
    assert args[-1] == "--simulate"


def test_the_summary_reads_ratios_and_says_when_no_arm_met_the_slo():
    rows = [
        {"workload": "agent", "length": "full", "slo": "loose", "rate": 2.0, "ratio": 1.25,
         "against": "best aggregated (agg-kv)", "adaptive": "adaptive"},
        {"workload": "agent", "length": "full", "slo": "loose", "rate": 2.0, "ratio": float("inf"),
         "against": "best static split (split-1x3)", "adaptive": "adaptive"},
        {"workload": "agent", "length": "full", "slo": "loose", "rate": 2.0, "ratio": 0.5,
         "against": "best aggregated (agg-kv)", "adaptive": "adaptive-split"},
    ]
    text = markdown(rows)
    assert "| agent | full | loose | 2x | adaptive | 1.25x (agg-kv) | n/a (split-1x3: none within the SLO) |" in text
    assert "| agent | full | loose | 2x | adaptive-split | 0.50x (agg-kv) | - |" in text


def test_a_planner_arm_is_never_the_aggregated_or_static_baseline():
    """The adaptive arm started aggregated has no prefill worker at the start, but it is no fixed aggregated
    configuration: every adaptive arm is measured against the arms without a planner only."""
    configs = "agg-kv=0x4:kv,split=1x3:kv,adaptive=0x4:kv:adaptive=1:planner=1,adaptive-split=1x3:kv:adaptive=1:planner=1"

    def run(name: str, goodput: float) -> dict:
        metrics = {"request_goodput": goodput, "median_ttft_ms": 1.0, "mean_tpot_ms": 1.0, "goodput_fraction": 0.5}
        return {"config": name, "rate": 1.0, "metrics": metrics}

    summary = summarize([[run("agg-kv", 1.0), run("split", 0.8), run("adaptive", 2.0), run("adaptive-split", 0.5)]],
                        configs)
    ratios = {(v["adaptive"], v["against"]): v["ratio"] for v in summary["verdicts"]}
    assert ratios == {
        ("adaptive", "best aggregated (agg-kv)"): 2.0, ("adaptive", "best static split (split)"): 2.5,
        ("adaptive-split", "best aggregated (agg-kv)"): 0.5, ("adaptive-split", "best static split (split)"): 0.625,
    }
