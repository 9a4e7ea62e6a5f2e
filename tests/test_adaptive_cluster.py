"""Cost-priced placement and TPOT-sized prompt chunks on a real 1 prefill + 1 decode cluster (Ray actors, NIXL,
the HTTP front door): answers equal a local engine's, the router prices from the workers' own fitted step
times once they are measured, and /metrics reports the decisions and their prediction error."""
import asyncio
import json
import shutil
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from disagg.cluster.launch import ClusterConfig, RouterConfig, Service
from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.protocol import SamplingParams
from disagg.router.placement import Placement
from disagg.router.policy import PolicyConfig

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_served_dir(tiny_llama_dir, smollm_dir, tmp_path_factory):
    """The tiny model with the default model's tokenizer (the front door needs one; prompts here are token ids
    under the tiny vocabulary)."""
    path = tmp_path_factory.mktemp("served") / "tiny"
    shutil.copytree(tiny_llama_dir, path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(smollm_dir / name, path / name)
    return path


def _metrics(url):
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
            for s in f.samples}


async def _complete_all(url, model, prompts):
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(prompt):
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                           "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        return await asyncio.gather(*(one(p) for p in prompts))


def test_cost_placement_prices_from_measured_steps_and_reports_its_error(ray_session, tiny_served_dir):
    engine = EngineConfig(model=str(tiny_served_dir), num_blocks=160, block_size=16, num_threads=1, max_model_len=512,
                          max_num_batched_tokens=64, prefill_chunk_target_ms=50.0, step_fit_every=4)
    service = Service(ClusterConfig(num_prefill=1, num_decode=1, engine=engine),
                      RouterConfig(policy=PolicyConfig(placement=Placement.COST, ttft_target_s=2.0, seed=0)))
    try:
        model = httpx.get(f"{service.url}/v1/models", timeout=30).json()["data"][0]["id"]
        local = LLMEngine(EngineConfig(model=str(tiny_served_dir), num_blocks=160, block_size=16))
        greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        deadline, rounds, measured = time.monotonic() + 90, 0, 0.0
        while measured == 0 and time.monotonic() < deadline:  # until both workers' fits are warm
            prompts = [[(rounds * 131 + i * 17 + j) % 500 + 5 for j in range(70 + 45 * i)] for i in range(6)]
            texts = asyncio.run(_complete_all(service.url, model, prompts))
            assert texts == [r.text for r in local.generate(prompts, greedy)]  # wherever each prompt was computed
            measured = _metrics(service.url).get(("disagg:placements_total", (("priced_from", "measured"),)), 0.0)
            rounds += 1
        assert measured > 0, "no decision priced from measured step times"
        m = _metrics(service.url)
        assert m[("disagg:placements_total", (("priced_from", "prior"),))] >= 1  # the cold start said so
        done = m[("disagg:ttft_predictions_total", ())]
        assert done == 6 * rounds  # every first attempt predicted its TTFT
        assert 0 < m[("disagg:ttft_prediction_error_total", ())] / done < 100  # finite, and not all exact
        within = {dict(k[1])["le"]: v for k, v in m.items() if k[0] == "disagg:ttft_prediction_relative_error_bucket"}
        assert within["+Inf"] == done and within["0.05"] <= within["0.2"] <= done, within  # a histogram of them
        targets = {k[1]: v for k, v in m.items() if k[0] == "disagg:worker_chunk_target_s"}
        fitted = {k[1]: v for k, v in m.items() if k[0] == "disagg:worker_step_s_per_new_token"}
        assert len(targets) == 2 and all(v == pytest.approx(0.05) for v in targets.values()), targets
        assert len(fitted) == 2 and all(v > 0 for v in fitted.values()), fitted  # both workers' fits are warm
        factors = {k[1]: v for k, v in m.items() if k[0] == "disagg:worker_ttft_correction"}
        assert len(factors) == 2 and all(0.5 <= v <= 4.0 for v in factors.values()), factors  # learned, bounded
    finally:
        service.shutdown()


def test_flexible_an_idle_prefill_worker_serves_a_request_whole_when_the_decode_batch_is_full(
    ray_session, tiny_served_dir
):
    """Fits kept cold (never refitted), so both workers are priced with the documented prior: a decode step of
    32 ms + 5.85 ms per sequence (and its context).  With a 41 ms TPOT target the idle decode worker takes the first
    request (~38 ms with it); once it decodes that one, a second would break the target there (~44 ms), and the
    idle prefill worker serves it whole."""
    engine = EngineConfig(model=str(tiny_served_dir), num_blocks=160, block_size=16, num_threads=1, max_model_len=512,
                          step_fit_every=1_000_000)
    policy = PolicyConfig(placement=Placement.COST, flexible=True, ttft_target_s=2.0, tpot_target_s=0.041, seed=0)
    service = Service(ClusterConfig(num_prefill=1, num_decode=1, engine=engine), RouterConfig(policy=policy))
    try:
        model = httpx.get(f"{service.url}/v1/models", timeout=30).json()["data"][0]["id"]
        local = LLMEngine(EngineConfig(model=str(tiny_served_dir), num_blocks=160, block_size=16))
        long_prompt, short_prompt = [(7 * j) % 500 + 5 for j in range(40)], [(11 * j) % 500 + 5 for j in range(90)]
        body = {"model": model, "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=service.url, timeout=120) as client:
            with client.stream("POST", "/v1/completions",
                               json={**body, "prompt": long_prompt, "max_tokens": 400, "stream": True}) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))  # decoding on the decode worker
                r = client.post("/v1/completions", json={**body, "prompt": short_prompt, "max_tokens": MAX_TOKENS})
                assert r.status_code == 200, r.text
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        chunks = [first, *rest[:-1]]
        streamed = "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks)
        greedy = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (400, MAX_TOKENS)]
        expected = [local.generate([p], g)[0].text for p, g in zip((long_prompt, short_prompt), greedy)]
        assert [streamed, r.json()["choices"][0]["text"]] == expected
        routed = {dict(k[1])["mode"]: dict(k[1])["decode_worker"] for k, v in _metrics(service.url).items()
                  if k[0] == "disagg:routed_requests_total" and v > 0}
        assert set(routed) - {"local", "disaggregated"} == {"flexible"}, routed
        assert "prefill" in routed["flexible"] and "prefill" not in routed.get("local", routed.get("disaggregated"))
    finally:
        service.shutdown()
