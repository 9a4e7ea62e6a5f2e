"""`disagg bench` tools: the product's own (simulate, agent) and the bench lab's, found as plugins in the
`disagg.bench` entry-point group that pyproject.toml registers (the product never imports bench/)."""
import importlib
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from disagg import cli

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _registered() -> dict[str, str]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"][cli.BENCH_GROUP]


def test_every_registered_bench_tool_imports_and_is_callable():
    tools = _registered()
    assert {"replay", "compare", "calibrate", "chaos", "overload"} <= set(tools)
    assert not set(tools) & set(cli._PRODUCT_TOOLS)  # a plugin never shadows a product tool
    for name, target in tools.items():
        module, _, attr = target.partition(":")
        assert module.split(".")[0] == "bench", name
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_the_cli_discovers_plugins_through_entry_points(monkeypatch):
    calls = []

    def fake_tool(argv):
        calls.append(argv)
        return 7

    def fake_entry_points(group):
        assert group == cli.BENCH_GROUP
        # what bench_tools reads of an EntryPoint: its name and load(); "simulate" cannot replace the product's
        return [SimpleNamespace(name=name, load=lambda: fake_tool) for name in ("fake", "simulate")]

    monkeypatch.setattr(cli, "entry_points", fake_entry_points)
    tools = cli.bench_tools()
    assert set(tools) == {"fake", "simulate", "agent"}
    assert tools["simulate"]() is importlib.import_module("disagg.sim.run").main
    assert cli.main(["bench", "fake", "--x", "1"]) == 7
    assert calls == [["--x", "1"]]
    with pytest.raises(SystemExit):
        cli.main(["bench", "missing"])
