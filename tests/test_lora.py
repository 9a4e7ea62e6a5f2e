"""LoRA adapters in the engine (disagg/engine/lora.py): token-for-token equal to PEFT's merged model in HF, unlike
the base model; several adapters and the base in one batch; KV never shared across adapters; a bounded cache;
bad adapters refused with the reason."""
import json

import pytest

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.model_store import make_tiny_model
from disagg.protocol import LoRARef, SamplingParams
from bench.loras import make_lora, merged_greedy

N = 16
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
PROMPTS = [[(11 * i + 5) % 500 + 3 for i in range(40)], [(13 * i + 1) % 500 + 3 for i in range(23)]]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "all": make_lora(tiny_llama_dir, root / "all", seed=0),
        "qv": make_lora(tiny_llama_dir, root / "qv", seed=1, targets=("q_proj", "v_proj"), rank=4, alpha=8,
                        use_rslora=True),
    }


def _engine(model_dir, **kw):
    return LLMEngine(EngineConfig(model=str(model_dir), num_blocks=128, max_model_len=512, num_threads=1, **kw))


def _run(engine, prompts_and_refs):
    for i, (prompt, ref) in enumerate(prompts_and_refs):
        engine.add_request(f"r{i}", prompt, GREEDY, lora=ref)
    seqs = [engine.seqs[f"r{i}"] for i in range(len(prompts_and_refs))]
    while engine.has_unfinished():
        engine.step()
    return [s.token_ids[s.num_prompt_tokens:] for s in seqs], seqs


def test_an_adapter_equals_peft_merged_in_hf_and_differs_from_the_base(tiny_llama_dir, adapters):
    engine = _engine(tiny_llama_dir)
    for name, path in adapters.items():
        ref = LoRARef(name, str(path))
        for prompt in PROMPTS:
            expected = merged_greedy(tiny_llama_dir, path, prompt, N)
            assert _run(engine, [(prompt, ref)])[0][0] == expected, name
            assert expected != merged_greedy(tiny_llama_dir, None, prompt, N), f"{name} did not change the model"


def test_adapters_and_the_base_in_one_batch_are_each_as_alone(tiny_llama_dir, adapters):
    refs = [None, LoRARef("all", str(adapters["all"])), LoRARef("qv", str(adapters["qv"]))]
    batch = [(PROMPTS[i % 2], refs[i % 3]) for i in range(6)]
    together, _ = _run(_engine(tiny_llama_dir), batch)
    alone = [_run(_engine(tiny_llama_dir), [item])[0][0] for item in batch]
    assert together == alone
    assert len({tuple(t) for t in together}) >= 4  # base and adapters really differ


def test_an_even_mix_runs_in_place_and_an_uneven_one_gathered_with_the_same_tokens(tiny_llama_dir, adapters):
    """Rows come interleaved (all, qv, base, ...); the engine orders them by adapter, so in decode steps each
    adapter's tokens are one run of equal length (the in-place path), while an uneven mix takes the gathered path.  Both give each request's tokens as alone."""
    refs = [LoRARef("all", str(adapters["all"])), LoRARef("qv", str(adapters["qv"])), None]
    for mix, runs in (([0, 1, 2, 0, 1, 2], {80, 2}), ([0, 1, 0, 2, 0, 2], {0})):  # 2+2 / 3+1 adapted rows
        engine = _engine(tiny_llama_dir)
        batch = [(PROMPTS[0], refs[k]) for k in mix]
        for i, (prompt, ref) in enumerate(batch):
            engine.add_request(f"r{i}", prompt, GREEDY, lora=ref)
        seqs, uniform = [engine.seqs[f"r{i}"] for i in range(len(batch))], []
        while engine.has_unfinished():
            engine.step()
            uniform.append(engine.runner.lora.context.uniform)
        assert set(uniform) == runs, uniform  # even: the prefill (40 tokens each), then decodes (1 each)
        together = [seq.token_ids[seq.num_prompt_tokens:] for seq in seqs]
        assert together == [_run(_engine(tiny_llama_dir), [item])[0][0] for item in batch]


def test_no_kv_is_shared_between_the_base_and_adapters(tiny_llama_dir, adapters):
    engine = _engine(tiny_llama_dir)
    prompt, ref = PROMPTS[0], LoRARef("all", str(adapters["all"]))
    _run(engine, [(prompt, None)])
    engine.seqs.clear()
    (_, [first]) = _run(engine, [(prompt, ref)])
    engine.seqs.clear()
    (_, [again]) = _run(engine, [(prompt, ref)])
    engine.seqs.clear()
    (_, [other]) = _run(engine, [(prompt, LoRARef("qv", str(adapters["qv"])))])
    assert (first.num_cached_tokens, other.num_cached_tokens) == (0, 0)
    assert again.num_cached_tokens >= 32  # its own prefix is cached


def test_the_adapter_cache_is_bounded_and_reloads_on_demand(tiny_llama_dir, adapters):
    engine = _engine(tiny_llama_dir, max_loras=1)
    a, b = LoRARef("all", str(adapters["all"])), LoRARef("qv", str(adapters["qv"]))
    outputs = []
    for i, ref in enumerate([a, b, a]):
        outputs.append(_run(engine, [(PROMPTS[1], ref)])[0][0])
        engine.seqs.clear()
    cache = engine.runner.lora.cache
    assert cache.loads == 3 and len(cache.resident()) == 1  # a was evicted by b, then loaded again
    assert outputs[0] == outputs[2] != outputs[1]
    together, _ = _run(engine, [(PROMPTS[0], a), (PROMPTS[0], b)])  # one at a time: the cache never holds two
    assert together == [merged_greedy(tiny_llama_dir, adapters[k], PROMPTS[0], N) for k in ("all", "qv")]
    assert len(cache.resident()) == 1


def test_a_step_runs_at_most_max_loras_adapters_and_the_others_wait_their_turn(tiny_llama_dir, adapters, tmp_path):
    third = make_lora(tiny_llama_dir, tmp_path / "third", seed=2)
    refs = [LoRARef("all", str(adapters["all"])), LoRARef("qv", str(adapters["qv"])), LoRARef("third", str(third))]
    engine = _engine(tiny_llama_dir, max_loras=2)
    batch = [(PROMPTS[i % 2], refs[i % 3] if i % 4 else None) for i in range(8)]  # 3 adapters and the base
    for i, (prompt, ref) in enumerate(batch):
        engine.add_request(f"r{i}", prompt, GREEDY, lora=ref)
    seqs = [engine.seqs[f"r{i}"] for i in range(len(batch))]
    most = 0
    while engine.has_unfinished():
        engine.step()
        running = {s.lora.name for s in engine.scheduler.running if s.lora is not None}
        most = max(most, len(running))
        assert len(engine.runner.lora.cache.resident()) <= 2
    assert most == 2  # the cap was reached, never passed
    together = [s.token_ids[s.num_prompt_tokens:] for s in seqs]
    assert together == [_run(_engine(tiny_llama_dir), [item])[0][0] for item in batch]  # each as alone


def test_bad_adapters_are_refused_with_the_reason(tiny_llama_dir, adapters, tmp_path):
    engine = _engine(tiny_llama_dir)
    wide = make_tiny_model(tmp_path / "wide", "llama", seed=2, hidden_size=96)
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in adapters["all"].iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cases = [
        (LoRARef("nothing", str(tmp_path / "missing")), "no adapter_config.json"),
        (LoRARef("wrong-base", str(make_lora(wide, tmp_path / "wide-lora", seed=3, steps=1))), "another base model"),
        (LoRARef("dora", str(dora)), "DoRA"),
    ]
    for ref, named in cases:
        with pytest.raises(ValueError, match=named):
            engine.add_request("bad", PROMPTS[0], GREEDY, lora=ref)
        assert "bad" not in engine.seqs
    with pytest.raises(ValueError, match="serves no LoRA adapters"):
        _engine(tiny_llama_dir, max_loras=0).add_request("x", PROMPTS[0], GREEDY, lora=cases[0][0])


def test_the_router_sends_an_adapter_back_where_it_last_ran():
    from disagg.protocol import Request
    from disagg.router.policy import PolicyConfig
    from disagg.router.router import RouterCore

    def spread(lora):
        core = RouterCore({}, {f"w{i}": None for i in range(4)}, PolicyConfig(seed=0), block_size=16)
        workers = []
        for i in range(6):
            request = Request(f"r{i}", [(37 * i + j) % 500 for j in range(40)], lora=lora)
            decision = core.route(request)
            core.begin(decision, request.num_tokens, core.block_hashes(request))  # it runs there: load grows
            workers.append(decision.decode_worker)
        return workers

    adapted, base = spread(LoRARef("a", "/adapters/a")), spread(None)
    assert len(set(base)) == 4  # base requests spread over the load at once
    assert adapted[0] == adapted[1] and adapted[2] == adapted[3]  # it stays where its weights are loaded ...
    assert len(set(adapted)) < 4  # ... until the load there outweighs loading them elsewhere


def test_retrained_weights_in_the_same_directory_are_another_adapter(tiny_llama_dir, tmp_path):
    from disagg.models.adapters import AdapterError, check_adapter
    from disagg.protocol import hash_salt

    path = make_lora(tiny_llama_dir, tmp_path / "a", seed=0, steps=1)
    first = check_adapter(path, tiny_llama_dir)
    (path / "adapter_config.json").unlink()
    make_lora(tiny_llama_dir, path, seed=1, steps=1)  # retrained into the same directory
    second = check_adapter(path, tiny_llama_dir)
    assert first != second
    assert hash_salt(None, LoRARef("a", str(path), first)) != hash_salt(None, LoRARef("a", str(path), second))
    config = json.loads((path / "adapter_config.json").read_text())
    for bad, named in (({"r": 0}, "r must be a positive integer"), ({"lora_alpha": "x"}, "lora_alpha must be")):
        (path / "adapter_config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(AdapterError, match=named):
            check_adapter(path, tiny_llama_dir)
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(AdapterError, match="unreadable|not a safetensors"):
        check_adapter(path, tiny_llama_dir)
    with pytest.raises(ValueError, match="unreadable"):  # the worker's own load says the same, as a 400
        _engine(tiny_llama_dir).add_request("x", PROMPTS[0], GREEDY, lora=LoRARef("a", str(path)))
