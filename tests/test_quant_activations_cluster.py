"""q4 weights with int8 activations (`--quant-activations int8`) on a real cluster: Ray on 127.0.0.1, 1 prefill +
1 decode worker, real HTTP, n-gram speculation on the decode worker.

The prompt is prefilled on the prefill worker by the native step (integer activations), its KV blocks move to the
decode worker over NIXL, and the decode worker verifies proposals in native steps too.  Each token's arithmetic in
the native step does not depend on what else is in the step, so the answer must be, token for token, the one a
single local engine of the same weights and activations gives without speculation.  float32 activations give
another answer to this prompt (checked), so a worker that never got the option fails the test; int16 would not
show it (its tokens equal float32's here).
"""

import httpx
import pytest

from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.protocol import SamplingParams
from disagg.router.policy import PolicyConfig

CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
MESSAGES = [{"role": "user", "content": f"Repeat this code exactly:\n{CODE}"}]
Q4 = {"quantization": "q4", "max_model_len": 512, "kv_cache_memory_mb": 64}
Q4_INT8 = {**Q4, "quant_activations": "int8"}


@pytest.fixture(scope="module")
def service(ray_session, smollm_dir):
    engine = EngineConfig(model=str(smollm_dir), num_threads=1, speculative="ngram", **Q4_INT8)
    svc = Service(
        ClusterConfig(num_prefill=1, num_decode=1, engine=engine, tiers=None),
        RouterConfig(policy=PolicyConfig(min_remote_prefill_tokens=16)),
    )
    yield svc
    svc.shutdown()


def test_disaggregated_int8_activation_answers_are_plain_local_decoding(service, smollm_dir):
    local = LLMEngine(EngineConfig(model=str(smollm_dir), **Q4_INT8))
    assert local.runner.kernel_path.endswith("+stack")
    prompt = local.tokenizer.encode_chat(MESSAGES)
    assert len(prompt) <= local.runner.native_step.max_tokens  # prefilled in one native step on either side
    greedy = SamplingParams(max_tokens=48, temperature=0)
    want = local.generate([prompt], greedy)[0]
    float_activations = LLMEngine(EngineConfig(model=str(smollm_dir), **Q4))
    assert float_activations.generate([prompt], greedy)[0].text != want.text  # the option shows in the answer
    body = {"model": smollm_dir.name, "messages": MESSAGES, "max_tokens": 48, "temperature": 0}
    r = httpx.post(f"{service.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] == want.text
    assert answer["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0
    metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert 'disagg:requests_by_path_total{path="disaggregated"}' in metrics  # the KV moved to the decode worker
