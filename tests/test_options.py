"""CLI options generated from config dataclasses (disagg/options.py): defaults and help come from the dataclass,
types parse, enums are checked, and a round trip rebuilds the config."""
import argparse
import enum
from dataclasses import dataclass, field

import pytest

from disagg.options import add_options, from_options


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Demo:
    block_size: int = 16
    ratio: float = 0.5
    name: str = "x"
    enabled: bool = True
    limit: int | None = None
    color: Color = Color.RED
    kv_cache_memory_mb: int = field(default=256, metadata={"flag": "--kv-cache-mb", "help": "KV per worker"})
    hidden: int = field(default=3, metadata={"cli": False})
    tags: list[str] = field(default_factory=list)  # not a scalar: no option


def _parser(**kw):
    p = argparse.ArgumentParser()
    add_options(p, Demo, **kw)
    return p


def test_defaults_round_trip_and_every_type_parses():
    p = _parser()
    assert from_options(Demo, p.parse_args([])) == Demo()
    args = p.parse_args(["--block-size", "32", "--ratio", "0.25", "--name", "y", "--no-enabled", "--limit", "7",
                         "--color", "blue", "--kv-cache-mb", "64"])
    assert from_options(Demo, args) == Demo(32, 0.25, "y", False, 7, Color.BLUE, 64)
    assert from_options(Demo, p.parse_args(["--limit", "none"])).limit is None
    assert "--hidden" not in p.format_help() and "--tags" not in p.format_help()
    assert "KV per worker (default 256)" in " ".join(p.format_help().split())


def test_bad_values_are_refused_and_prefixes_and_per_cli_defaults_apply():
    with pytest.raises(SystemExit):
        _parser().parse_args(["--color", "green"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--block-size", "many"])
    p = _parser(prefix="sim-", defaults={"block_size": 8}, skip={"name"})
    args = p.parse_args(["--sim-ratio", "2"])
    assert from_options(Demo, args, prefix="sim-") == Demo(block_size=8, ratio=2.0)
    assert from_options(Demo, args, prefix="sim-", name="z").name == "z"


@dataclass
class Plan:
    workers: int = field(metadata={"help": "workers to split"})
    rate: float = 1.0
    label: str = ""


def test_a_field_without_default_is_required_and_only_picks_fields():
    p = argparse.ArgumentParser()
    add_options(p, Plan)
    with pytest.raises(SystemExit):
        p.parse_args([])
    assert from_options(Plan, p.parse_args(["--workers", "4"])) == Plan(4)
    q = argparse.ArgumentParser()
    add_options(q, Demo, only={"block_size", "kv_cache_memory_mb"}, defaults={"kv_cache_memory_mb": 128})
    assert vars(q.parse_args([])) == {"block_size": 16, "kv_cache_memory_mb": 128}
    r = argparse.ArgumentParser()
    add_options(r, Plan, defaults={"workers": 2})  # a per-CLI default makes it optional
    assert r.parse_args([]).workers == 2


@dataclass
class Tool:
    result: str = field(metadata={"positional": True, "help": "a saved result"})
    sizes: list[int] = field(default_factory=lambda: [1, 8], metadata={"nargs": "+", "help": "sizes to try"})
    pair: tuple[float, ...] = field(default=(0.5,), metadata={"nargs": "+"})
    arrival: str = field(default="trace", metadata={"choices": ("trace", "poisson")})
    prior: list[str] = field(default_factory=list, metadata={"nargs": "append", "help": "repeat me"})


def test_positional_nargs_and_choices_metadata():
    p = argparse.ArgumentParser()
    add_options(p, Tool)
    assert from_options(Tool, p.parse_args(["r.json"])) == Tool("r.json")
    args = p.parse_args(["r.json", "--sizes", "2", "3", "--pair", "1", "2.5", "--arrival", "poisson"])
    assert from_options(Tool, args) == Tool("r.json", [2, 3], (1.0, 2.5), "poisson")  # a tuple stays a tuple
    assert p.parse_args(["r.json", "--prior", "a", "--prior", "b"]).prior == ["a", "b"]
    assert p.parse_args(["r.json"]).prior == []  # the default list was not appended to
    for bad in ([], ["r.json", "--arrival", "fixed"], ["r.json", "--sizes"], ["r.json", "--sizes", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    assert "sizes to try (default 1 8)" in " ".join(p.format_help().split())


def test_a_list_field_without_nargs_stays_off_and_nargs_on_a_scalar_is_refused():
    assert "--tags" not in _parser().format_help()

    @dataclass
    class Bad:
        n: int = field(default=1, metadata={"nargs": "+"})

    with pytest.raises(TypeError):
        add_options(argparse.ArgumentParser(), Bad)


def test_from_options_reads_only_the_fields_asked_for():
    # two dataclasses sharing one parser: `only` keeps the second from taking the first's same-named options
    p = argparse.ArgumentParser()
    add_options(p, Demo, only={"block_size"})
    add_options(p, Plan, only={"workers"}, defaults={"workers": 2})
    args = p.parse_args(["--block-size", "8"])
    args.rate = 9.0  # an option some other dataclass added under this name
    assert from_options(Plan, args, only={"workers"}) == Plan(2)
    assert from_options(Plan, args) == Plan(2, rate=9.0)
    assert from_options(Demo, args, only={"block_size"}) == Demo(block_size=8)
