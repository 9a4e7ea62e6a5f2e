"""The disaggregation matrix's cells (bench/matrix.py): the arms at a worker count, each cell's arguments, and
the summary of the adaptive arm against the best aggregated and static arms (a cell where nothing met the SLO
says so instead of a ratio)."""
from pathlib import Path

from bench.matrix import MatrixOptions, cell_args, configs, markdown
from disagg.sim.spec import parse_configs


def test_the_arms_cover_aggregated_static_splits_and_the_adaptive_runtime():
    specs = {s.name: s for s in parse_configs(configs(16))}
    assert {n for n, s in specs.items() if s.num_prefill == 0} == {"agg-rr", "agg-kv"}
    assert {(s.num_prefill, s.num_decode) for n, s in specs.items() if n.startswith("split-")} == {
        (4, 12), (8, 8), (12, 4)}
    assert specs["adaptive"].adaptive and (specs["adaptive"].num_prefill, specs["adaptive"].num_decode) == (4, 12)
    assert len(parse_configs(configs(2))) == 4  # 2 workers: one split (1x1) besides the two aggregated arms


def test_a_cell_passes_its_workload_lengths_and_slo_on():
    args = cell_args(MatrixOptions(workers=4, simulate=True), "agent", "quarter", "tpot-binds", Path("/tmp/x"))
    assert args[:2] == ["--agent", "coding_agent"] and "--sessions" in args and "--limit" not in args
    assert args[args.index("--block-tokens") + 1] == "128" and args[args.index("--slo-tpot-ms") + 1] == "100"
    assert args[-1] == "--simulate"


def test_the_summary_reads_ratios_and_says_when_no_arm_met_the_slo():
    rows = [
        {"workload": "agent", "length": "full", "slo": "loose", "rate": 2.0, "ratio": 1.25,
         "against": "best aggregated (agg-kv)"},
        {"workload": "agent", "length": "full", "slo": "loose", "rate": 2.0, "ratio": float("inf"),
         "against": "best static split (split-1x3)"},
    ]
    text = markdown(rows)
    assert "| agent | full | loose | 2x | 1.25x (agg-kv) | n/a (split-1x3: none within the SLO) |" in text
