"""Streams outlive their relay (issue 23), in-process: real engines (tiny model) behind the fake handles, two router
replicas (two cores and apps over the same workers), and a raw ASGI client that can break its connection after any
SSE event.  A replica 'dies' by `Replica.kill()`: its streams then end without telling the worker (as a killed
process), while a live replica whose client hangs up aborts at once.

- a client cut by a dying relay reconnects to the other replica with Last-Event-ID: the rest arrives, and the two
  connections' chunks equal an uninterrupted run's; one generation, not two;
- orphan grace: with nobody back in time the request is aborted and its blocks freed (then 404);
- a live relay's client hanging up frees the blocks at once (then 404);
- another tenant's Last-Event-ID is a 404, like an expired one;
- a repeated Idempotency-Key gets the same body from the journal (also after a cut), with one generation;
- after a migration the events name the new worker, and a resume from there completes exactly.
The tiny model has no tokenizer (its text is empty): requests ask for logprobs, whose token strings the default
model's tokenizer decodes, so every chunk carries the tokens it adds.
"""
import asyncio
import time

import pytest

from disagg.cluster.journal import JournalConfig
from disagg.config import FaultConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.http.config import ApiKey
from disagg.http.resume import ResumeToken
from disagg.stats import WorkerStats
from tests.fakes import local_worker
from tests.sse_client import Replica, call

PROMPT = [300 + i for i in range(8)]
ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"
KEYS = {ALICE: ApiKey("alice"), BOB: ApiKey("bob")}


def _body(max_tokens=24, stream=True, prompt=PROMPT):
    return {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, "logprobs": 1}


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    return Tokenizer.from_dir(smollm_dir)


def _count_adds(worker):
    """The request ids the worker's engine was given (one per generation)."""
    added, add = [], worker.engine.add

    def counting(request, **kw):
        added.append(request.request_id)
        return add(request, **kw)
    worker.engine.add = counting
    return added


async def _all_free(worker, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = WorkerStats.from_wire(await worker.stats())
        if s.kv_blocks_free == s.kv_blocks_total and not s.running and not s.waiting:
            return True
        await asyncio.sleep(0.02)
    return False


def _worker(model_dir, name="w", slow=1.0, **journal):
    """A worker; `slow` stretches each engine step (a sleep, no CPU) so a long answer is still running when a test
    looks at it."""
    return local_worker(name, model_dir, journal=JournalConfig(**journal), faults=FaultConfig(slow_factor=slow))


def content(reply):
    """What each chunk adds to the answer: its text, token strings and their offsets, and the finish reason (the
    logprob values are left out where two runs compute them differently: a migrated request's prefill)."""
    return [(c["text"], c["logprobs"]["tokens"], c["logprobs"]["text_offset"], c["finish_reason"])
            for choices in reply.choices for c in choices]


def test_a_client_cut_by_a_dying_relay_resumes_on_another_replica_exactly(tiny_llama_dir, tokenizer):
    async def go():
        w = _worker(tiny_llama_dir, slow=4.0)
        a, b = Replica({"w": w}, tokenizer), Replica({"w": w}, tokenizer)
        reference = await call(b.app, _body(max_tokens=64))
        added = _count_adds(w)
        a.kill()
        cut = await call(a.app, _body(max_tokens=64), cut_after=6)
        running = bool(w.engine.seqs)  # the relay is gone, the generation goes on
        rest = await call(b.app, _body(max_tokens=64), headers={"Last-Event-ID": cut.last_id})
        return reference, cut, rest, added, running
    reference, cut, rest, added, running = asyncio.run(go())
    assert running
    assert reference.status == cut.status == rest.status == 200
    assert len(cut.events) == 6 and rest.events[-1][1] == "[DONE]"
    assert cut.choices + rest.choices == reference.choices  # text, token strings, logprobs, offsets, finish
    assert content(cut) + content(rest) == content(reference)
    assert {c["id"] for c in cut.chunks + rest.chunks} == {cut.chunks[0]["id"]} != {reference.chunks[0]["id"]}
    assert {c["created"] for c in cut.chunks + rest.chunks} == {cut.chunks[0]["created"]}
    assert len(added) == 1  # the reconnect attached to the running generation: no second one
    tokens = [ResumeToken.parse(i) for i, _ in cut.events + rest.events]
    assert {t.worker for t in tokens} == {"w"} and tokens[-1].delivered == 64


def test_an_orphan_nobody_reattaches_to_is_aborted_after_the_grace_and_its_blocks_freed(tiny_llama_dir, tokenizer):
    async def go():
        w = _worker(tiny_llama_dir, slow=5.0, orphan_grace_s=0.3)
        a, b = Replica({"w": w}, tokenizer), Replica({"w": w}, tokenizer)
        a.kill()
        cut = await call(a.app, _body(max_tokens=480), cut_after=3)
        assert len(w.journal) == 1  # kept, generating, for a reconnect
        await asyncio.sleep(0.6)
        late = await call(b.app, _body(max_tokens=480), headers={"Last-Event-ID": cut.last_id})
        return w, late, await _all_free(w), WorkerStats.from_wire(await w.stats())
    w, late, free, stats = asyncio.run(go())
    assert late.status == 404 and late.json()["error"]["code"] == "stream_not_found"
    assert free and w.journal.orphans_aborted == 1
    assert stats.generated_tokens < 480  # aborted, not run to the end


def test_a_live_relays_client_hanging_up_aborts_at_once(tiny_llama_dir, tokenizer):
    async def go():
        w = _worker(tiny_llama_dir, slow=5.0)  # a 30 s grace: only the explicit abort frees it this soon
        a = Replica({"w": w}, tokenizer)
        cut = await call(a.app, _body(max_tokens=480), cut_after=3)
        free = await _all_free(w, timeout=1.0)
        again = await call(a.app, _body(max_tokens=480), headers={"Last-Event-ID": cut.last_id})
        return w, free, again
    w, free, again = asyncio.run(go())
    assert free and len(w.journal) == 0
    assert again.status == 404 and again.json()["error"]["code"] == "stream_not_found"


def test_another_tenants_resume_is_not_found_and_an_expired_stream_too(tiny_llama_dir, tokenizer):
    async def go():
        w = _worker(tiny_llama_dir, ttl_s=1.0)
        a, b = (Replica({"w": w}, tokenizer, keys=KEYS) for _ in range(2))
        reference = await call(b.app, _body(), headers={"Authorization": f"Bearer {ALICE}"})
        a.kill()
        cut = await call(a.app, _body(), headers={"Authorization": f"Bearer {ALICE}"}, cut_after=4)
        resume = {"Last-Event-ID": cut.last_id}
        bob = await call(b.app, _body(), headers={"Authorization": f"Bearer {BOB}", **resume})
        alice = await call(b.app, _body(), headers={"Authorization": f"Bearer {ALICE}", **resume})
        await asyncio.sleep(1.2)  # past the TTL of the finished stream
        expired = await call(b.app, _body(), headers={"Authorization": f"Bearer {ALICE}", **resume})
        garbage = await call(b.app, _body(), headers={"Authorization": f"Bearer {ALICE}", "Last-Event-ID": "3"})
        return reference, cut, bob, alice, expired, garbage
    reference, cut, bob, alice, expired, garbage = asyncio.run(go())
    assert garbage.status == 400 and garbage.json()["error"]["code"] == "invalid_last_event_id"
    assert bob.status == 404 and bob.json()["error"]["code"] == "stream_not_found"
    assert alice.status == 200 and content(cut) + content(alice) == content(reference)
    assert expired.status == 404 and expired.json()["error"]["code"] == "stream_not_found"


def test_a_repeated_idempotency_key_gets_the_same_answer_from_one_generation(tiny_llama_dir, tokenizer):
    async def go():
        w = _worker(tiny_llama_dir, slow=3.0)
        a, b = Replica({"w": w}, tokenizer), Replica({"w": w}, tokenizer)
        reference = (await call(b.app, _body(max_tokens=400, stream=False))).json()
        added = _count_adds(w)
        first = await call(a.app, _body(stream=False), headers={"Idempotency-Key": "k1"})
        again = await call(b.app, _body(stream=False), headers={"Idempotency-Key": "k1"})
        other = await call(b.app, _body(stream=False, prompt=PROMPT[:6]), headers={"Idempotency-Key": "k1"})
        a.kill()  # a relay dies while it collects a long answer: the repeat gets it from the journal
        cut = await call(a.app, _body(max_tokens=400, stream=False), headers={"Idempotency-Key": "k2"},
                         cut_after_s=0.05)
        repeat = await call(b.app, _body(max_tokens=400, stream=False), headers={"Idempotency-Key": "k2"})
        return reference, first, again, other, cut, repeat, added
    reference, first, again, other, cut, repeat, added = asyncio.run(go())
    assert first.status == again.status == 200 and first.json() == again.json()
    assert other.status == 400 and other.json()["error"]["code"] == "resume_mismatch"
    assert cut.status == 0  # no answer reached the client before it was cut
    assert repeat.status == 200 and repeat.json()["choices"] == reference["choices"]
    assert len(added) == 2 and len(set(added)) == 2  # k1 once, k2 once


def test_after_a_migration_events_name_the_new_worker_and_a_resume_from_there_completes(tiny_llama_dir, tokenizer):
    async def go():
        ref_worker = _worker(tiny_llama_dir, "ref")
        reference = await call(Replica({"ref": ref_worker}, tokenizer).app, _body())
        workers = {n: _worker(tiny_llama_dir, n) for n in ("a", "b")}
        first, second = Replica(workers, tokenizer), Replica(workers, tokenizer)

        def fail_a_then_die(reply):
            if len(reply.events) == 5:
                first.handles["a"].dead = True  # its worker is lost: the stream migrates to b
            if len(reply.events) == 12:
                first.kill()  # then the relay itself dies
        cut = await call(first.app, _body(), cut_after=12, on_event=fail_a_then_die)
        rest = await call(second.app, _body(), headers={"Last-Event-ID": cut.last_id})
        return reference, cut, rest
    reference, cut, rest = asyncio.run(go())
    workers = [ResumeToken.parse(i).worker for i, _ in cut.events]
    assert workers[0] == "a" and workers[-1] == "b", workers
    assert workers == sorted(workers)  # a until the migration, b after it
    assert rest.status == 200 and content(cut) + content(rest) == content(reference)
