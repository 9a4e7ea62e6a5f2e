"""Responses and Messages streams outlive their relay too (issue 26), in-process: the default model behind two
router replicas over one worker (tests/sse_client.py).  A client cut by a dying replica reconnects to the other
with Last-Event-ID and gets the events after the last one it had: the two connections' events are the
uninterrupted stream's, in order, each once (same types, same text, the Responses `sequence_number`s 0..n-1 once
each, the same response and item ids), from one generation.  A Last-Event-ID that is not one of ours is a 400 in
the API's own error shape; another tenant's stream does not exist (404)."""
import asyncio
import json

import pytest

from disagg.cluster.journal import JournalConfig
from disagg.config import FaultConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.http.config import ApiKey
from disagg.http.resume import ResumeToken
from tests.fakes import local_worker
from tests.sse_client import Replica, call

QUESTION = "Tell me about the city of Paris."
ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"
KEYS = {ALICE: ApiKey("alice"), BOB: ApiKey("bob")}
BODIES = {
    "/v1/messages": {"model": "m", "max_tokens": 40, "temperature": 0, "stream": True,
                     "messages": [{"role": "user", "content": QUESTION}]},
    "/v1/responses": {"model": "m", "input": QUESTION, "max_output_tokens": 40, "temperature": 0, "stream": True},
}


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    return Tokenizer.from_dir(smollm_dir)


def _worker(smollm_dir):
    # each engine step stretched (a sleep, no CPU): the answer is still running when the client is cut
    return local_worker("w", smollm_dir, journal=JournalConfig(), faults=FaultConfig(slow_factor=3.0),
                        max_model_len=512)


def _events(reply):
    return [json.loads(data) for _, data in reply.events]


def _text(events):
    return "".join(e["delta"].get("text", "") if e["type"] == "content_block_delta" else e.get("delta", "")
                   for e in events if e["type"] in ("content_block_delta", "response.output_text.delta"))


def _ids(events):
    """The response / message and item ids the events name."""
    found = set()
    for e in events:
        for key in ("response", "message", "item"):
            if isinstance(e.get(key), dict):
                found.add(e[key]["id"])
        if "item_id" in e:
            found.add(e["item_id"])
    return found


def _resumed(smollm_dir, tokenizer, path, cut_after):
    async def go():
        w = _worker(smollm_dir)
        a, b = Replica({"w": w}, tokenizer, keys=KEYS), Replica({"w": w}, tokenizer, keys=KEYS)
        alice = {"Authorization": f"Bearer {ALICE}"}
        reference = await call(b.app, BODIES[path], alice, path=path)
        added, add = [], w.engine.add
        w.engine.add = lambda request, **kw: added.append(request.request_id) or add(request, **kw)
        a.kill()
        cut = await call(a.app, BODIES[path], alice, cut_after=cut_after, path=path)
        bob = await call(b.app, BODIES[path], {"Authorization": f"Bearer {BOB}", "Last-Event-ID": cut.last_id},
                         path=path)
        rest = await call(b.app, BODIES[path], {**alice, "Last-Event-ID": cut.last_id}, path=path)
        garbage = await call(b.app, BODIES[path], {**alice, "Last-Event-ID": "not-a-token"}, path=path)
        return reference, cut, rest, added, bob, garbage
    return asyncio.run(go())


def test_a_messages_stream_cut_by_a_dying_relay_resumes_on_another_replica_exactly(smollm_dir, tokenizer):
    reference, cut, rest, added, bob, garbage = _resumed(smollm_dir, tokenizer, "/v1/messages", cut_after=5)
    assert reference.status == cut.status == rest.status == 200 and len(cut.events) == 5
    ref, got = _events(reference), _events(cut) + _events(rest)
    assert [e["type"] for e in got] == [e["type"] for e in ref]  # each event once, in order, none missing
    assert _text(got) == _text(ref) and _text(_events(rest))  # the rest carried text, and it joins exactly
    assert got[-2]["delta"] == ref[-2]["delta"] and got[-1]["type"] == "message_stop"
    assert len(_ids(got)) == 1  # the message id of the cut connection is the one the resumed stream ends with
    assert len(added) == 1  # one generation: the reconnect attached to it
    tokens = [ResumeToken.parse(i) for i, _ in cut.events + rest.events]
    assert len({(t.delivered, t.events) for t in tokens}) == len(tokens)  # every event has its own position
    assert bob.status == 404 and json.loads(bob.raw)["type"] == "error"  # another tenant: no such stream
    assert garbage.status == 400 and json.loads(garbage.raw)["error"]["type"] == "invalid_request_error"


def test_a_responses_stream_cut_by_a_dying_relay_resumes_on_another_replica_exactly(smollm_dir, tokenizer):
    reference, cut, rest, added, bob, garbage = _resumed(smollm_dir, tokenizer, "/v1/responses", cut_after=6)
    assert reference.status == cut.status == rest.status == 200 and len(cut.events) == 6
    ref, got = _events(reference), _events(cut) + _events(rest)
    assert [e["type"] for e in got] == [e["type"] for e in ref]
    assert [e["sequence_number"] for e in got] == list(range(len(ref)))
    assert _text(got) == _text(ref) and _text(_events(rest))
    done = got[-1]["response"]
    assert got[-1]["type"] == ref[-1]["type"] and done["output"][0]["content"][0]["text"] == _text(ref)
    assert done["id"] == got[0]["response"]["id"] and len(_ids(got)) == 2  # the response and its message item
    assert len(added) == 1
    assert bob.status == 404 and "error" in json.loads(bob.raw)
    assert garbage.status == 400 and json.loads(garbage.raw)["error"]["code"] == "invalid_last_event_id"


def test_tool_call_ids_derive_from_the_request_so_a_resumed_stream_names_them_alike(tokenizer):
    from disagg.http.shape import AnswerShape
    from disagg.protocol import FinishReason, TokenDelta

    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'

    def ids(seed):
        shape = AnswerShape(tokenizer, chat=True, tools={"get_weather"})
        if seed is not None:
            shape.name_calls(seed)
        choice = shape.stream_choice(TokenDelta("r", [1], call, finish_reason=FinishReason.STOP))
        return [c["id"] for c in choice["delta"]["tool_calls"]]

    assert ids("resp_1") == ids("resp_1") != ids("resp_2") and ids("resp_1")[0].startswith("call_")
    assert ids(None) != ids(None)  # a shape no request named keeps random ids


def test_a_resume_token_from_before_event_indexes_still_parses():
    import base64

    import msgpack

    old = {"type": "resume_token", "worker": "w", "request_id": "cmpl-1", "delivered": 7}
    text = base64.urlsafe_b64encode(msgpack.packb(old)).rstrip(b"=").decode()
    token = ResumeToken.parse(text)
    assert (token.worker, token.request_id, token.delivered, token.events) == ("w", "cmpl-1", 7, 0)
