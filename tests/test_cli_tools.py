"""`disagg bench` tools: the product's own (simulate, agent) and the bench lab's, found as plugins in the
`disagg.bench` entry-point group that pyproject.toml registers (the product never imports bench/)."""

import argparse
import importlib
import re
import shlex
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


# ---------------------------------------------------------------- the bench lab's CLIs come from config dataclasses
ROOT = PYPROJECT.parent
# modules allowed hand-written `add_argument` calls (what disagg/options.py cannot express), with why: only the
# top-level dispatcher (sub-commands, and the rest of a command line passed through to `plan` / `bench` tools) -
# positionals, lists (nargs), repeated options (append), choices, aliases and parsed maps have metadata
HAND_WRITTEN_OPTIONS: dict[str, int] = {"disagg.cli": 5}


def _bench_mains(*roots: str) -> list[str]:
    """Every module (of bench/, or of `roots`) that builds an argparse parser."""
    mods = []
    for root in roots or ("bench",):
        for path in sorted((ROOT / root).rglob("*.py")):
            if "ArgumentParser(" in path.read_text() and path.name != "options.py":
                mods.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return mods


def test_no_cli_writes_its_options_by_hand():
    import ast

    found = {}
    for mod in _bench_mains("bench", "disagg"):
        tree = ast.parse((ROOT / (mod.replace(".", "/") + ".py")).read_text())
        calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
        names = [f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "") for f in calls]
        if n := names.count("add_argument"):
            found[mod] = n
        assert "add_options" in names or "add_replay_args" in names or mod in HAND_WRITTEN_OPTIONS, mod
    assert found == HAND_WRITTEN_OPTIONS
    assert {"disagg.cluster.serve_cli", "disagg.sim.run", "disagg.workload.agent"} <= set(_bench_mains("disagg"))
    assert len(_bench_mains()) >= 17  # the scan sees the tools (chaos, peers, ..., sim.validate)


class _Parsed(Exception):
    pass


def _parse(module: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run `module`'s main up to its parse and return the namespace (nothing of the tool itself runs)."""
    real = argparse.ArgumentParser.parse_args
    got = []

    def parse(self, args=None, namespace=None):
        got.append(real(self, args, namespace))
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    with pytest.raises(_Parsed):
        importlib.import_module(module).main(argv)
    monkeypatch.undo()
    return got[0]


@pytest.mark.parametrize("module", _bench_mains())
def test_every_bench_cli_builds_its_help(module, capsys):
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    assert "--" in capsys.readouterr().out


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(module, argv) of every bench command in a bash block of the README and docs/benchmarks.md."""
    tools = {name: target.partition(":")[0] for name, target in _registered().items()}
    out = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "benchmarks.md"):
        blocks = re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)
        for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
            if "$" in line or not re.search(r"-m bench\.|disagg bench ", line):
                continue  # shell variables: not a literal command
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w == "-m" and words[i + 1].startswith("bench."):
                    out.append((words[i + 1], words[i + 2 :]))
                elif w.endswith("disagg") and words[i + 1 : i + 2] == ["bench"] and words[i + 2] in tools:
                    out.append((tools[words[i + 2]], words[i + 3 :]))
    return out


def test_the_documented_bench_commands_still_parse(monkeypatch):
    commands = _documented_commands()
    assert {m for m, _ in commands} >= {"bench.chaos", "bench.peers", "bench.compare", "bench.sim.validate"}
    for module, argv in commands:
        _parse(module, [a for a in argv if a not in ("|", "&&")], monkeypatch)


def test_the_defaults_the_docs_rely_on(monkeypatch):
    from bench.chaos import CHAOS_KV_CACHE_MB
    from disagg.config import EngineConfig

    chaos = _parse("bench.chaos", [], monkeypatch)
    assert chaos.kv_cache_memory_mb == CHAOS_KV_CACHE_MB == 128 and chaos.max_model_len == EngineConfig.max_model_len
    peers = _parse("bench.peers", [], monkeypatch)
    assert (peers.block_size, peers.kv_cache_memory_mb, peers.slo_ttft_ms, peers.bind_vllm) == (32, 1024, 5000.0, False)
    replay = _parse("bench.replay", ["--url", "u", "--no-ignore-eos", "--no-progress"], monkeypatch)
    assert (replay.ignore_eos, replay.progress, replay.request_timeout_s) == (False, False, 600.0)
    validate = _parse("bench.sim.validate", ["--prior", "a.json", "--prior", "b.json@x"], monkeypatch)
    assert validate.prior == ["a.json", "b.json@x"] and validate.vocab_size == 49152


def test_the_peers_slo_system_sizes_its_chunks_from_the_tpot_slo(monkeypatch):
    from bench.peers import systems
    from disagg.sim.spec import ADAPTIVE_TPOT_SHARE

    args = _parse(
        "bench.peers", ["--slo-tpot-ms", "250", "--systems", "disagg-agg-q4a16,disagg-agg-q4a16-slo"], monkeypatch
    )
    plain, slo = systems(args, "model-dir", "served")
    assert [plain.name, slo.name] == ["disagg-agg-q4a16", "disagg-agg-q4a16-slo"]
    assert slo.command == [*plain.command, "--prefill-chunk-target-ms", str(250 * ADAPTIVE_TPOT_SHARE)]
    assert "--prefill-chunk-target-ms" not in plain.command
