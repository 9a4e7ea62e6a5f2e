"""Several models behind one router (issue 25, parts 1-2), on a real Ray cluster over real HTTP: the default model
(aggregated), a fixed-seed tiny Llama (1 prefill + 1 decode) and a fixed-seed tiny Qwen2 (aggregated), declared in
one deployment.  Each answers as it does alone; the `model` field routes; one model's cached prefix is never
another's; unknown models get each API's 404; probes, /metrics and /admin speak per model."""
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
def service(dirs):
    pools = {"smollm": (0, 1), "tiny-llama": (1, 1), "tiny-qwen": (0, 1)}
    deployment = deployment_of(
        {"models": [{"id": m, "path": str(dirs[m]), "prefill": pools[m][0], "decode": pools[m][1]} for m in MODELS]},
        base=EngineConfig(kv_cache_memory_mb=64, num_threads=1, max_model_len=1024),
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    svc = Service(ClusterConfig(), RouterConfig(policy=PolicyConfig(min_remote_prefill_tokens=16)),
                  deployment=deployment)
    yield svc
    svc.shutdown()
    ray.shutdown()


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


def test_models_lists_every_model_in_order(http):
    listed = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == list(MODELS)
    assert all(m["max_model_len"] == 1024 for m in listed)


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
    # a role change names a worker; it stays within its model (the last decoder of a model cannot stop decoding)
    qwen_worker = next(iter(roles["tiny-qwen"]["roles"]))
    refused = http.post(f"/admin/workers/{qwen_worker}/role", json={"role": "prefill"})
    assert refused.status_code == 400 and "last decode-capable" in refused.json()["error"]["message"]
    unknown = http.post("/admin/workers/nobody/role", json={"role": "prefill"})
    assert unknown.status_code == 400 and "no worker named" in unknown.json()["error"]["message"]
