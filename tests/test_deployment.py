"""A deployment of several models (disagg/models/deployment.py): the file's three formats, a clear error for each
bad field, and the model namespace in block hashes (disagg/isolation.py)."""
import json

import pytest

from disagg.config import EngineConfig
from disagg.isolation import IsolationConfig, model_salted, salt_root
from disagg.models.deployment import DeploymentError, deployment_of, load_deployment
from disagg.protocol import hash_block_tokens

TOML = """
[[models]]
id = "smollm"

[[models]]
id = "coder@2"
path = "{path}"
prefill = 0
decode = 2
[models.engine]
kv_cache_memory_mb = 96
max_num_seqs = 8
"""


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _two(model_dir):
    return {"models": [{"id": "smollm"}, {"id": "coder@2", "path": str(model_dir), "prefill": 0, "decode": 2,
                                           "engine": {"kv_cache_memory_mb": 96, "max_num_seqs": 8}}]}


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_the_three_formats_read_the_same(tmp_path, model_dir, suffix):
    path = tmp_path / f"deploy{suffix}"
    if suffix == ".toml":
        path.write_text(TOML.format(path=model_dir))
    elif suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(_two(model_dir)))
    else:
        path.write_text(json.dumps(_two(model_dir)))
    base = EngineConfig(num_threads=1, kv_cache_memory_mb=200)
    deployment = load_deployment(path, base)
    assert deployment.ids() == ["smollm", "coder@2"]
    smollm, coder = deployment.models
    assert (smollm.path, smollm.prefill, smollm.decode) == ("", 1, 1)
    assert smollm.engine == EngineConfig(num_threads=1, kv_cache_memory_mb=200)  # the command line's settings
    assert (coder.prefill, coder.decode) == (0, 2)
    assert coder.engine.model == str(model_dir)
    assert (coder.engine.kv_cache_memory_mb, coder.engine.max_num_seqs, coder.engine.num_threads) == (96, 8, 1)
    assert coder.worker_prefix == "coder_2-"
    assert deployment.namespaced


def test_one_model_is_not_namespaced(model_dir):
    assert not deployment_of({"models": [{"id": "a", "path": str(model_dir)}]}).namespaced


@pytest.mark.parametrize("data, named", [
    ({}, "models: Field required"),
    ({"models": []}, "models: List should have at least 1 item"),
    ({"models": [{"path": ""}]}, "models[0].id: Field required"),
    ({"models": [{"id": "a", "decode": 0}]}, "models[0].decode: Input should be greater than or equal to 1"),
    ({"models": [{"id": "a", "prefill": -1}]}, "models[0].prefill: Input should be greater than or equal to 0"),
    ({"models": [{"id": "a", "decode": "two"}]}, "models[0].decode: Input should be a valid integer"),
    ({"models": [{"id": "a", "gpus": 1}]}, "models[0].gpus: Extra inputs are not permitted"),
    ({"models": [{"id": "a"}], "routers": 2}, "routers: Extra inputs are not permitted"),
    ({"models": [{"id": "has space"}]}, "models[0].id: Value error, must start with a letter or digit"),
    ({"models": [{"id": "a"}, {"id": "a"}]}, "models[1]: 'a' is served twice"),
    ({"models": [{"id": "a"}, {"id": "b", "aliases": ["a"]}]}, "models[1]: 'a' is served twice"),
    ({"models": [{"id": "a", "engine": {"kv_cache_mb": 1}}]}, "models[0].engine.kv_cache_mb: not an engine setting"),
    ({"models": [{"id": "a", "engine": {"model": "/x"}}]}, "models[0].engine.model: not an engine setting"),
    ({"models": [{"id": "a", "engine": {"max_num_seqs": "8"}}]}, "models[0].engine.max_num_seqs: Input should be a "
                                                                  "valid integer (got '8')"),
    ({"models": [{"id": "a", "engine": {"block_size": 12}}]}, "models[0].engine: block_size must be a power of two"),
    ({"models": [{"id": "a", "engine": {"quantization": "q3"}}]}, "models[0].engine: --quantization"),
    ({"models": [{"id": "a/b"}, {"id": "a:b"}]}, "two model ids map to the same worker names"),
    ({"models": [{"id": "a", "decode": 100_000}]}, "models[0].decode: Input should be less than or equal to 1024"),
    ({"models": [{"id": "a", "adapters": {"x": "/a"}, "engine": {"max_loras": 0}}]}, "serve no adapters"),
    ({"models": [{"id": "a", "adapters": {"a": "/a"}}]}, "models[0]: 'a' is served twice"),
    ({"models": [{"id": "a", "standby": -1}]}, "models[0].standby: Input should be greater than or equal to 0"),
    ({"models": [{"id": "a", "standby": 1, "engine": {"device": "cuda"}}]}, "models[0].standby: standby workers sleep"),
    ({"models": [{"id": "a", "encode": 1}]}, "models[0].encode: the default model is not a vision-language model"),
    ({"models": [{"id": "a", "encode": -1}]}, "models[0].encode: Input should be greater than or equal to 0"),
])
def test_each_bad_field_is_named(data, named):
    with pytest.raises(DeploymentError) as err:
        deployment_of(data)
    assert named in str(err.value)


def test_a_path_that_is_no_model_is_named(tmp_path):
    with pytest.raises(DeploymentError, match=r"models\[0\]\.path: .* is not a directory"):
        deployment_of({"models": [{"id": "a", "path": str(tmp_path / "missing")}]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeploymentError, match=r"models\[0\]\.path: .* holds no config.json and no GGUF file"):
        deployment_of({"models": [{"id": "a", "path": str(tmp_path / "empty")}]})


@pytest.mark.parametrize("name, text, named", [
    ("d.toml", "[[models]\nid=", "not valid TOML"),
    ("d.yaml", "models: [", "not valid YAML"),
    ("d.json", "{", "not valid JSON"),
    ("d.ini", "[models]", "a deployment file is .toml, .yaml, .yml or .json"),
])
def test_a_file_that_does_not_parse_is_named(tmp_path, name, text, named):
    (tmp_path / name).write_text(text)
    with pytest.raises(DeploymentError, match=named):
        load_deployment(tmp_path / name)
    with pytest.raises(DeploymentError, match="cannot read the deployment file"):
        load_deployment(tmp_path / "absent.toml")


def _chain(salt, tokens=tuple(range(32)), block=16):
    parent, out = salt_root(salt), []
    for i in range(0, len(tokens), block):
        parent = hash_block_tokens(parent, tokens[i:i + block])
        out.append(parent)
    return out


def test_models_never_share_a_block_hash_whatever_the_tenant():
    isolation = IsolationConfig(share_groups={"bob": "team"})
    salts = [isolation.cache_salt(t, requested) for t in ("default", "alice", "bob") for requested in (None, "s")]
    chains = {(ns, salt): tuple(_chain(model_salted(ns, salt))) for ns in ("", "llama", "qwen") for salt in salts}
    assert len(set(chains.values())) == len(chains)  # every (model, salt) pair its own chain
    assert model_salted("", None) is None  # a single model's default tenant: the unsalted chain of before
    assert model_salted("", "x") == "x"
    # a client's cache_salt can never name a model's chain
    assert model_salted("llama", None) != IsolationConfig().cache_salt("default", "model\x00llama\x01")


class _Started(Exception):
    pass


def _started(*_a, **kw):
    raise _Started(kw.get("deployment"))  # the checks passed and serve went on to start the cluster


def test_serve_refuses_a_bad_deployment_or_adapter_before_starting(monkeypatch, capsys, tmp_path, tiny_llama_dir):
    from disagg.cluster import serve_cli

    monkeypatch.setattr(serve_cli, "Service", _started)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nid = "a"\ndecode = 0\n')
    assert serve_cli.main(["--deployment", str(bad)]) == serve_cli.EXIT_REFUSED
    assert "models[0].decode" in capsys.readouterr().err
    assert serve_cli.main(["--model", str(tiny_llama_dir), "--lora-modules", f"x={tmp_path}"]) == serve_cli.EXIT_REFUSED
    assert "adapter_config.json" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text(f'[[models]]\nid = "a"\npath = "{tiny_llama_dir}"\n[[models]]\nid = "b"\npath = "{tiny_llama_dir}"\n')
    with pytest.raises(_Started) as started:
        serve_cli.main(["--deployment", str(good), "--kv-cache-mb", "32"])
    deployment = started.value.args[0]
    assert deployment.ids() == ["a", "b"] and all(m.engine.kv_cache_memory_mb == 32 for m in deployment.models)
    from bench.loras import make_lora

    adapter = make_lora(tiny_llama_dir, tmp_path / "sql", seed=0, steps=1)
    with pytest.raises(_Started) as started:  # --lora-modules: the --model alone, with its adapters
        serve_cli.main(["--model", str(tiny_llama_dir), "--lora-modules", f"sql={adapter}"])
    (model,) = started.value.args[0].models
    assert model.id == tiny_llama_dir.name and [(a.name, a.path) for a in model.adapters] == [("sql", str(adapter))]
    assert serve_cli.main(["--deployment", str(good), "--lora-modules", f"sql={adapter}"]) == serve_cli.EXIT_REFUSED
    assert "list them there" in capsys.readouterr().err
    with pytest.raises(_Started) as started:  # standby workers: started with the rest, parked asleep
        standby = tmp_path / "standby.toml"
        standby.write_text(good.read_text().replace('id = "b"', 'id = "b"\nstandby = 2'))
        serve_cli.main(["--deployment", str(standby), "--fleet-planner"])
    assert [m.standby for m in started.value.args[0].models] == [0, 2]
    # each router replica would move workers on its own
    assert serve_cli.main(["--deployment", str(good), "--fleet-planner", "--replicas", "2"]) == serve_cli.EXIT_REFUSED
    assert "--fleet-planner needs a single router" in capsys.readouterr().err
    for flags in (["--sleep-after-idle-s", "60"], ["--wake-on-request"]):  # so would each sleep and wake models
        assert serve_cli.main(["--deployment", str(good), *flags, "--replicas", "2"]) == serve_cli.EXIT_REFUSED
        assert "need a single router" in capsys.readouterr().err


def test_aliases_pick_by_weight_and_refuse_what_cannot_be_a_weight():
    from disagg.errors import Conflict, InvalidRequest
    from disagg.models.aliases import AliasTable

    table = AliasTable()
    route = table.set("coder", {"coder@1": 90, "coder@2": 10}, {"coder@1", "coder@2"})
    picks = [route.pick(i / 1000) for i in range(1000)]
    assert picks.count("coder@2") == 100 and route.share("coder@2") == 0.1
    assert table.pointing_at("coder@2") == ["coder"]
    for weights in ({"coder@1": float("nan")}, {"coder@1": float("inf")}, {"coder@1": 0}, {"coder@1": True}, {}):
        with pytest.raises(InvalidRequest):
            table.set("coder", weights, {"coder@1"})
    with pytest.raises(InvalidRequest, match="not served"):
        table.set("coder", {"coder@3": 1}, {"coder@1"})
    with pytest.raises(Conflict):
        table.set("coder@1", {"coder@1": 1}, {"coder@1"})  # an alias never shadows a model id
