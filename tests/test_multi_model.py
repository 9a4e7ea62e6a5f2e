"""Several models behind one router (issue 25, parts 1-2), on a real Ray cluster over real HTTP: the default model
(aggregated), a fixed-seed tiny Llama (1 prefill + 1 decode) and a fixed-seed tiny Qwen2 (aggregated), declared in
one deployment.  Each answers as it does alone; the `model` field routes; one model's cached prefix is never
another's; unknown models get each API's 404; probes, /metrics and /admin speak per model."""
import collections
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray

from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.model_store import make_tiny_model
from disagg.models.deployment import deployment_of
from disagg.protocol import SamplingParams
from disagg.router.policy import PolicyConfig
from bench.loras import make_lora, merged_greedy

MODELS = ("smollm", "tiny-llama", "tiny-qwen")
PROMPT = "The history of the printing press begins in the fifteenth century, when movable type changed how books " \
         "were made, sold and read across Europe; within fifty years"


@pytest.fixture(scope="module")
def dirs(smollm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return {
        "smollm": smollm_dir,
        "tiny-llama": make_tiny_model(root / "tiny-llama", "llama", seed=3, tokenizer_from=smollm_dir),
        "tiny-qwen": make_tiny_model(root / "tiny-qwen", "qwen2", seed=4, tokenizer_from=smollm_dir),
    }


@pytest.fixture(scope="module")
def loras(dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"llama-all": make_lora(dirs["tiny-llama"], root / "all", seed=0),
            "llama-qv": make_lora(dirs["tiny-llama"], root / "qv", seed=1, targets=("q_proj", "v_proj"), rank=4)}


@pytest.fixture(scope="module")
def service(ray_session, dirs, loras):
    pools = {"smollm": (0, 1), "tiny-llama": (1, 1), "tiny-qwen": (0, 1)}
    entries = [{"id": m, "path": str(dirs[m]), "prefill": pools[m][0], "decode": pools[m][1]} for m in MODELS]
    entries[1]["adapters"] = {"llama-all": str(loras["llama-all"])}  # declared; llama-qv is loaded at run time
    deployment = deployment_of(
        {"models": entries},
        base=EngineConfig(kv_cache_memory_mb=64, num_threads=1, max_model_len=1024),
    )
    svc = Service(ClusterConfig(), RouterConfig(policy=PolicyConfig(min_remote_prefill_tokens=16)),
                  deployment=deployment)
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service.url, timeout=120) as client:
        yield client


def _complete(http, model, prompt, max_tokens=12):
    reply = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


def _cached(answer) -> int:
    return (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def test_models_lists_every_model_in_order(http, loras):
    listed = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == [*MODELS, "llama-all"]
    assert all(m["max_model_len"] == 1024 for m in listed)
    assert (listed[-1]["parent"], listed[-1]["root"]) == ("tiny-llama", str(loras["llama-all"]))


@pytest.mark.parametrize("model", MODELS)
def test_each_model_answers_as_it_does_alone(http, dirs, model):
    engine = LLMEngine(EngineConfig(model=str(dirs[model]), num_blocks=64, max_model_len=1024, num_threads=1))
    ids = engine.tokenizer.encode(PROMPT)
    expected = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0))[0]
    for prompt in (PROMPT, ids):  # text, and the same tokens as ids
        choice = _complete(http, model, prompt)["choices"][0]
        assert choice["text"] == expected.text
        assert choice["finish_reason"] == expected.finish_reason
    chat = http.post("/v1/chat/completions", json={"model": model, "max_tokens": 8, "temperature": 0,
                                                    "messages": [{"role": "user", "content": "Name a colour."}]})
    assert chat.status_code == 200 and chat.json()["model"] == model


def test_the_same_prompt_on_two_models_shares_no_cache_hit(http):
    prompt = "A prefix no other test sends. " + PROMPT
    first = _complete(http, "tiny-llama", prompt, max_tokens=2)
    again = _complete(http, "tiny-llama", prompt, max_tokens=2)
    assert _cached(first) == 0 and _cached(again) >= 16  # the prompt is cached for its own model
    for model in ("tiny-qwen", "smollm"):
        other = _complete(http, model, prompt, max_tokens=2)
        assert other["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]  # the same token ids
        assert _cached(other) == 0, model


def test_unknown_model_gets_each_api_s_404(http):
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/responses", {"input": "hi"})):
        reply = http.post(path, json={"model": "gpt-nope", **body})
        assert reply.status_code == 404, path
        assert reply.json()["error"]["code"] == "model_not_found"
    reply = http.post("/v1/messages", json={"model": "gpt-nope", "max_tokens": 4,
                                            "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"
    assert http.get("/health").status_code == 200  # and everything still serves


def test_probes_metrics_and_admin_speak_per_model(service, http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and set(health["models"]) == set(MODELS)
    assert health["models"]["tiny-llama"]["prefill_workers"] == 1
    assert all(h["decode_workers"] == 1 for h in health["models"].values())
    roles = http.get("/admin/roles").json()["models"]
    llama_workers = set(roles["tiny-llama"]["roles"])
    assert llama_workers == set(service.clusters["tiny-llama"].workers_by_name)
    assert all(name.startswith("tiny-llama-") for name in llama_workers)
    metrics = http.get("/metrics").text
    for model in MODELS:
        assert f'model="{model}"' in metrics
        assert f'disagg:time_to_first_token_seconds_count{{model="{model}"}}' in metrics  # the front door's, too
    # a role change names a worker; it stays within its model (the last decoder of a model cannot stop decoding)
    qwen_worker = next(iter(roles["tiny-qwen"]["roles"]))
    refused = http.post(f"/admin/workers/{qwen_worker}/role", json={"role": "prefill"})
    assert refused.status_code == 400 and "last decode-capable" in refused.json()["error"]["message"]
    unknown = http.post("/admin/workers/nobody/role", json={"role": "prefill"})
    assert unknown.status_code == 400 and "no worker named" in unknown.json()["error"]["message"]


# --- models at run time: load, aliases (canary, cut-over, rollback), unload under load ---------------------------

def _stream_tokens(url, model, n, out, index, started):
    """One streamed completion of `n` tokens; records its status, finish reason and the tokens its usage counts."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=url, timeout=120) as client:
        with client.stream("POST", "/v1/completions", json=body) as reply:
            tokens, finish = 0, None
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    finish = chunk["choices"][0]["finish_reason"] or finish
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                started.set()
            out[index] = (reply.status_code, finish, tokens)


def _streaming(url, model, count, tokens=300):
    """`count` streams of `tokens` tokens on `model`, each past its first token when this returns."""
    results, started = [None] * count, [threading.Event() for _ in range(count)]
    streams = [threading.Thread(target=_stream_tokens, args=(url, model, tokens, results, i, started[i]))
               for i in range(count)]
    for t in streams:
        t.start()
    assert all(s.wait(60) for s in started)
    return results, streams


def test_a_bad_load_is_named_and_everything_keeps_serving(http, dirs, tmp_path):
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text((dirs["tiny-qwen"] / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    untokenized = tmp_path / "untokenized"
    untokenized.mkdir()
    for f in ("config.json", "model.safetensors"):
        (untokenized / f).write_bytes((dirs["tiny-qwen"] / f).read_bytes())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((dirs["tiny-qwen"] / f).read_bytes())
    for body, status, named in (
        ({"id": "x", "path": str(tmp_path / "missing")}, 400, "is not a directory"),
        ({"id": "x", "path": str(dirs["tiny-qwen"]), "engine": {"kv_cache_mb": 1}}, 400, "not an engine setting"),
        ({"id": "tiny-qwen", "path": str(dirs["tiny-qwen"])}, 409, "already served"),
        ({"id": "x", "path": str(dirs["tiny-qwen"]), "engine": {"kv_cache_memory_mb": 50_000_000}}, 400,
         "GiB is available"),
        ({"id": "x", "path": str(bad)}, 400, "did not start"),
        ({"id": "x", "path": str(untokenized)}, 400, "tokenizer.json not found"),
    ):
        reply = http.post("/admin/models", json=body)
        assert reply.status_code == status, reply.text
        assert named in reply.json()["error"]["message"], reply.text
    assert [m["id"] for m in http.get("/admin/models").json()["models"]] == [*MODELS, "llama-all"]
    assert not any(name.startswith("x-") for name in ray.util.list_named_actors())  # none left running
    assert _complete(http, "tiny-qwen", "still here", max_tokens=2)["choices"][0]["finish_reason"]


def test_version_replace_canary_rollback_and_unload_lose_nothing(service, http, dirs, tmp_path_factory):
    v2 = make_tiny_model(tmp_path_factory.mktemp("v2") / "tiny-qwen-v2", "qwen2", seed=5, tokenizer_from=dirs["smollm"])
    body = {"id": "tiny-qwen@2", "path": str(v2), "prefill": 0, "decode": 1}
    with ThreadPoolExecutor(2) as pool:  # two loads of one id at once: one wins, the other gets a 409
        statuses = sorted(r.status_code for r in pool.map(lambda _: httpx.post(f"{service.url}/admin/models",
                                                                               json=body, timeout=300), range(2)))
    assert statuses == [201, 409]
    engine = LLMEngine(EngineConfig(model=str(v2), num_blocks=64, max_model_len=1024, num_threads=1))
    expected = engine.generate([engine.tokenizer.encode(PROMPT)], SamplingParams(max_tokens=12, temperature=0))[0]
    assert _complete(http, "tiny-qwen@2", PROMPT)["choices"][0]["text"] == expected.text
    assert _cached(_complete(http, "tiny-qwen@2", PROMPT)) > 0  # its own cache
    assert "tiny-qwen@2" in [m["id"] for m in http.get("/v1/models").json()["data"]]

    # traffic on the alias the whole time the versions change under it: none of it may fail
    stop, failures, served = threading.Event(), [], collections.Counter()

    def steady():
        with httpx.Client(base_url=service.url, timeout=60) as client:
            while not stop.is_set():
                reply = client.post("/v1/completions", json={"model": "qwen", "prompt": "hi", "max_tokens": 1})
                (served.update([reply.json()["model"]]) if reply.status_code == 200 else failures.append(reply.text))

    assert http.put("/admin/aliases/qwen", json={"targets": {"tiny-qwen": 1}}).status_code == 200
    background = threading.Thread(target=steady)
    background.start()
    try:
        for bad in ('{"targets": {"tiny-qwen": NaN}}', '{"targets": {"tiny-qwen": Infinity}}',
                    '{"targets": {"tiny-qwen": -1}}', '{"targets": {}}', '{"targets": {"nobody": 1}}'):
            refused = http.put("/admin/aliases/qwen", content=bad, headers={"content-type": "application/json"})
            assert refused.status_code == 400, bad
        assert http.get("/v1/models").status_code == 200
        assert http.put("/admin/aliases/has space", json={"targets": {"tiny-qwen": 1}}).status_code == 400
        canary = http.put("/admin/aliases/qwen", json={"targets": {"tiny-qwen": 90, "tiny-qwen@2": 10}})
        assert canary.json()["shares"] == {"tiny-qwen": 0.9, "tiny-qwen@2": 0.1}
        with ThreadPoolExecutor(8) as pool:
            models = list(pool.map(lambda _: _complete(http, "qwen", "hi", max_tokens=1)["model"], range(400)))
        assert abs(models.count("tiny-qwen@2") / len(models) - 0.10) <= 0.05  # the canary's share, within 5 pp
        busy = http.delete("/admin/models/tiny-qwen@2")  # the alias still sends it requests
        assert busy.status_code == 409 and "qwen" in busy.json()["error"]["message"]
        assert http.put("/admin/aliases/qwen", json={"targets": {"tiny-qwen@2": 1}}).status_code == 200  # cut-over
        assert {_complete(http, "qwen", "hi", max_tokens=1)["model"] for _ in range(20)} == {"tiny-qwen@2"}
        assert http.put("/admin/aliases/qwen", json={"targets": {"tiny-qwen": 1}}).status_code == 200  # rollback
        assert {_complete(http, "qwen", "hi", max_tokens=1)["model"] for _ in range(20)} == {"tiny-qwen"}
    finally:
        stop.set()
        background.join()
    assert not failures and sum(served.values()) > 0, failures[:3]

    # unload under streaming load: the streams in flight finish whole, new requests get 503 + Retry-After
    results, streams = _streaming(service.url, "tiny-qwen@2", 4)
    with ThreadPoolExecutor(1) as pool:
        unloading = pool.submit(http.delete, "/admin/models/tiny-qwen@2")
        refused = _wait_for_status(http, "tiny-qwen@2", 503)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "model_unavailable"
        done = unloading.result(timeout=120)
    for t in streams:
        t.join()
    assert done.status_code == 200 and done.json()["drained"] is True
    assert results == [(200, "length", 300)] * 4  # every stream in flight completed, whole
    assert http.post("/v1/completions", json={"model": "tiny-qwen@2", "prompt": "hi"}).status_code == 404
    assert not any(name.startswith("tiny-qwen_2-") for name in ray.util.list_named_actors())  # its workers ended
    assert _complete(http, "tiny-qwen", "hi", max_tokens=2)["model"] == "tiny-qwen"


def _wait_for_status(http, model, status, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
        if reply.status_code == status:
            return reply
        time.sleep(0.02)
    raise AssertionError(f"{model} never answered {status}")


def _adapter_text(http, model, ids, n=12):
    reply = http.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": n, "temperature": 0,
                                                "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_lora_adapters_answer_as_peft_merged_and_keep_their_own_cache(http, dirs, loras):
    from disagg.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(dirs["tiny-llama"])
    ids = tokenizer.encode("An adapter-only prompt: " + PROMPT)
    expected = tokenizer.decode(merged_greedy(dirs["tiny-llama"], loras["llama-all"], ids, 12))
    base = _adapter_text(http, "tiny-llama", ids)
    adapted = _adapter_text(http, "llama-all", ids)
    assert adapted["choices"][0]["text"] == expected and adapted["model"] == "llama-all"
    assert base["choices"][0]["text"] != expected
    assert _cached(adapted) == 0  # the base model's KV of the same prompt is not the adapter's
    assert _cached(_adapter_text(http, "llama-all", ids)) >= 16  # its own is

    # an adapter loaded at run time, used, and unloaded; the base cannot go while adapters run on it
    bad = http.post("/admin/models/tiny-llama/adapters", json={"name": "broken", "path": str(dirs["tiny-qwen"])})
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    clash = http.post("/admin/models/tiny-llama/adapters", json={"name": "tiny-qwen", "path": str(loras["llama-qv"])})
    assert clash.status_code == 409
    added = http.post("/admin/models/tiny-llama/adapters", json={"name": "llama-qv", "path": str(loras["llama-qv"])})
    assert added.status_code == 201 and added.json()["parent"] == "tiny-llama"
    expected_qv = tokenizer.decode(merged_greedy(dirs["tiny-llama"], loras["llama-qv"], ids, 12))
    assert _adapter_text(http, "llama-qv", ids)["choices"][0]["text"] == expected_qv != expected
    refused = http.delete("/admin/models/tiny-llama")
    assert refused.status_code == 409 and "llama-" in refused.json()["error"]["message"]
    assert http.delete("/admin/models/llama-qv").status_code == 200
    assert http.post("/v1/completions", json={"model": "llama-qv", "prompt": "hi"}).status_code == 404


def test_sleep_under_load_loses_nothing_gives_kv_back_and_wake_answers_as_before(service, http):
    """Sleep the 1P+1D model while it streams: the streams finish whole, then its workers give their KV back; it and
    its adapter get 503s meanwhile, the other models serve; after a wake it answers as before."""
    before = _complete(http, "tiny-llama", PROMPT)["choices"][0]["text"]
    results, streams = _streaming(service.url, "tiny-llama", 2)
    with ThreadPoolExecutor(1) as pool:
        sleeping = pool.submit(http.post, "/admin/models/tiny-llama/sleep")
        refused = _wait_for_status(http, "tiny-llama", 503)  # refused from the start of the drain
        asleep = sleeping.result(timeout=120)
    for t in streams:
        t.join()
    assert results == [(200, "length", 300)] * 2  # the streams in flight finished, whole
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "model_unavailable"
    assert asleep.status_code == 200, asleep.text
    report = asleep.json()
    assert report["state"] == "sleeping" and len(report["workers"]) == 2
    assert all(w["state"] == "asleep" and w["released_bytes"] >= 60 << 20 for w in report["workers"].values())
    for model in ("tiny-llama", "llama-all"):  # the adapter runs on the sleeping base's workers
        reply = http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_unavailable", model
        assert "asleep" in reply.json()["error"]["message"]
    assert _complete(http, "tiny-qwen", "hi", max_tokens=2)["model"] == "tiny-qwen"  # the others serve
    states = {m["id"]: m["state"] for m in http.get("/admin/models").json()["models"]}
    assert states["tiny-llama"] == "sleeping" and states["tiny-qwen"] == "serving"
    assert http.post("/admin/models/tiny-llama/sleep").status_code == 409  # asleep already
    assert http.post("/admin/models/tiny-qwen/wake").status_code == 409  # awake already
    woke = http.post("/admin/models/tiny-llama/wake")
    assert woke.status_code == 200 and woke.json()["state"] == "serving"
    assert woke.json()["seconds"] < 1.0
    assert _complete(http, "tiny-llama", PROMPT)["choices"][0]["text"] == before
    assert _complete(http, "llama-all", "hi", max_tokens=2)["model"] == "llama-all"
