"""The engine's KV seam with in-process peers (no Ray, no NIXL): a peer's prefill read through the scheduler's
WAITING_FOR_KV state, read failures and hangs falling back to recompute without leaking a block, abort while
loading, and resuming a request after output a client already has (migration)."""
import dataclasses

import pytest

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.engine.sequence import SequenceStatus
from disagg.protocol import SamplingParams
from tests.fake_transport import Fault
from tests.kvutil import Node, connect, run, settle, text, tokens

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)


@pytest.fixture
def pair(tiny_llama_dir):
    prefill, decode = Node(tiny_llama_dir), Node(tiny_llama_dir)
    connect(prefill, decode)
    return prefill, decode


def _reference(model_dir, prompts, sampling):
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=64, block_size=16, max_model_len=512))
    return [r.token_ids for r in engine.generate(prompts, sampling)]


def _disaggregated(prefill, decode, rid, prompt, sampling):
    """Prefill on one node (first token, blocks leased), then hand the result to the other."""
    first = dataclasses.replace(sampling, max_tokens=1, stop=[])
    prefill.engine.add_request(rid, prompt, first, hold_kv=True)
    out = run([prefill], [rid])[rid]
    result = prefill.engine.connector.prefill_result(rid, prefill.name, out[-1].token_ids[0], None)
    decode.engine.add_request(rid, prompt, sampling, remote=result)
    return result


def test_peer_prefill_is_read_through_the_scheduler_and_matches_aggregated(pair, tiny_llama_dir):
    prefill, decode = pair
    prompts = [list(range(5, 45)), list(range(100, 148)), list(range(7, 12))]  # 48 tokens: an exact block multiple
    samplings = [GREEDY, SEEDED, GREEDY]
    expected = [_reference(tiny_llama_dir, [p], s)[0] for p, s in zip(prompts, samplings)]
    for i, (p, s) in enumerate(zip(prompts, samplings)):
        _disaggregated(prefill, decode, f"r{i}", p, s)
    seq = decode.engine.seqs["r0"]
    decode.engine.step()  # admission starts the read: the sequence waits for its KV, holding its blocks
    assert seq.status is SequenceStatus.WAITING_FOR_KV and seq.block_ids
    out = run([prefill, decode], ["r0", "r1", "r2"])
    assert [tokens(out[f"r{i}"]) for i in range(3)] == expected
    assert decode.peer.num_reads == 3 and decode.engine.connector.stats.loaded_blocks["peer"] == 3 + 3 + 1
    assert settle([prefill, decode])  # the reads' notifications released the prefill side's leases


def test_blocks_already_cached_locally_are_not_read_again(pair, tiny_llama_dir):
    prefill, decode = pair
    prompt = list(range(200, 248))  # 3 full blocks
    _disaggregated(prefill, decode, "a", prompt, GREEDY)
    run([prefill, decode], ["a"])
    read_before = decode.transport.bytes_read
    _disaggregated(prefill, decode, "b", prompt, GREEDY)  # the decode side caches all 3 blocks now
    out = run([prefill, decode], ["b"])
    assert tokens(out["b"]) == _reference(tiny_llama_dir, [prompt], GREEDY)[0]
    assert decode.transport.bytes_read == read_before and decode.peer.num_notify_only == 1
    assert settle([prefill, decode])


@pytest.mark.parametrize("fault", [Fault.READ_FAIL, Fault.READ_HANG])
def test_failed_or_hung_read_recomputes_and_leaks_nothing(pair, tiny_llama_dir, fault):
    prefill, decode = pair
    decode.engine.connector.load_timeout_s = 0.3
    decode.transport.inject(fault, hang_s=1.0)
    prompt = list(range(300, 350))
    _disaggregated(prefill, decode, "f", prompt, SEEDED)
    out = run([prefill, decode], ["f"])
    assert tokens(out["f"]) == _reference(tiny_llama_dir, [prompt], SEEDED)[0]
    assert decode.engine.scheduler.stats.failed_loads == 1
    prefill.engine.connector.release_lease("f")  # what the router does when the decode side fell back
    assert settle([prefill, decode])  # a hung read's blocks are held until it settles, then freed


def test_abort_while_loading_frees_everything(pair):
    prefill, decode = pair
    decode.transport.inject(Fault.READ_HANG, hang_s=0.5)
    _disaggregated(prefill, decode, "x", list(range(20, 70)), GREEDY)
    decode.engine.step()
    assert decode.engine.seqs["x"].status is SequenceStatus.WAITING_FOR_KV
    assert decode.engine.abort("x")
    assert decode.engine.connector.num_adopted_blocks > 0  # the hung read might still land: not reused yet
    prefill.engine.connector.release_lease("x")
    assert settle([prefill, decode])


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED, SamplingParams(max_tokens=14, temperature=0.7, seed=3)],
                         ids=["greedy", "seeded", "seeded-eos"])
def test_resumed_request_continues_exactly(tiny_llama_dir, sampling):
    node = Node(tiny_llama_dir)
    prompt = list(range(30, 75))
    node.engine.add_request("whole", prompt, sampling)
    whole = run([node], ["whole"])["whole"]
    cut = 4
    sent_tokens = tokens(whole[:cut])
    sent_text = text(whole[:cut])
    node.engine.add_request("rest", prompt, sampling, resume_token_ids=sent_tokens,
                            resume_num_chars=len(sent_text))
    rest = run([node], ["rest"])["rest"]
    assert sent_tokens + tokens(rest) == tokens(whole)
    assert sent_text + text(rest) == text(whole)
    assert rest[-1].finish_reason == whole[-1].finish_reason


def test_resumed_text_continues_with_no_duplicate_character(smollm_dir):
    engine = LLMEngine(EngineConfig(model=str(smollm_dir), kv_cache_memory_mb=64, max_model_len=512))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Count from one to ten in words."}])
    sampling = SamplingParams(max_tokens=40, temperature=0, stop=["\n5."])  # the model writes "1. 1\n2. 2\n..."

    def stream(rid, **resume):
        engine.add_request(rid, prompt, sampling, **resume)
        deltas = []
        while engine.has_unfinished():
            deltas += [d for d in engine.step() if d.request_id == rid]
        return deltas

    whole = stream("whole")
    assert whole[-1].finish_reason == "stop"
    for cut in (3, 9):
        sent_tokens, sent_text = tokens(whole[:cut]), text(whole[:cut])
        rest = stream(f"r{cut}", resume_token_ids=sent_tokens, resume_num_chars=len(sent_text))
        assert sent_tokens + tokens(rest) == tokens(whole)
        assert sent_text + text(rest) == text(whole)  # no character twice, none missing, stop string held back
        assert rest[-1].finish_reason == "stop"


def test_resume_rejects_what_cannot_continue(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, max_model_len=512))
    with pytest.raises(ValueError, match="room for at least one more token"):
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2), resume_token_ids=[4, 5])
    with pytest.raises(ValueError, match="resumed token ids"):
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=8), resume_token_ids=[10**6])
    assert not engine.has_unfinished()


def test_a_worker_gets_its_fault_injector_by_name_and_refuses_without_one(tiny_llama_dir):
    from disagg.cluster.worker import EngineWorker, WorkerConfig
    from disagg.transfer.factory import resolve_wrapper
    from tests.fake_transport import FaultyTransport, LocalTransport

    from disagg.config import EngineConfig

    engine = EngineConfig(model=str(tiny_llama_dir), num_blocks=64, block_size=16, max_model_len=512, num_threads=1)

    def worker(name, **options):
        return EngineWorker(WorkerConfig(name=name, engine=engine, tiers=None, **options),
                            transport_factory=lambda agent, _engine: LocalTransport(agent))

    faulty = worker("w-faulty", transport_wrapper="tests.fake_transport:FaultyTransport")  # as a Ray actor gets it
    plain = worker("w-plain")
    try:
        assert isinstance(faulty.transport, FaultyTransport)
        faulty.inject_fault("read_fail", 2)
        assert len(faulty.transport._faults) == 2
        with pytest.raises(ValueError, match="injects no faults"):
            plain.inject_fault("read_fail")
        with pytest.raises(ValueError, match="package.module:attribute"):
            resolve_wrapper("tests.fake_transport.FaultyTransport")
    finally:
        faulty.transport.close()
        plain.transport.close()


def test_a_load_carries_the_offer_apart_from_its_sources_typed_state():
    """KVLoad.remote is the owner's offer, KVLoad.handle the state of the source that started the load; a source
    handed a load another source started refuses it instead of misreading its state."""
    from disagg.kv.load import KVLoad, handle_if_started, handle_of
    from disagg.kv.peer import _PeerRead
    from disagg.kv.store import _TierLoad
    from disagg.protocol import PrefillResult, SourceKind, Tier
    from disagg.sim.tiers import LandsAt

    offer = PrefillResult("r", "p", [3], [Tier.DEVICE], 16, first_token=1)
    load = KVLoad("r", SourceKind.PEER, 0, 1, 16, 0.0, remote=offer)
    assert handle_if_started(load, _PeerRead) is None  # not started yet: abandoning it has nothing to undo
    with pytest.raises(TypeError):
        handle_of(load, _PeerRead)
    load.handle = _PeerRead(offer)
    assert handle_of(load, _PeerRead).result is offer
    for other in (_TierLoad, LandsAt):
        with pytest.raises(TypeError):
            handle_of(load, other)
