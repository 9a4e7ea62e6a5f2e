"""Agent hints and the agent APIs' pure parts: what `nvext` / `kv_hints` become (never a 400), the head start
`latency_sensitivity` gives inside its tenant's queue only, the expected output length the load book counts, the
Responses store (per tenant, bounded, TTL), and how Responses items and Anthropic turns become chat messages."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from disagg.errors import InvalidRequest, NotFound
from disagg.http.hints import RETENTION_DEFAULT_S, Hint, read_hints, ttl_seconds
from disagg.http.inputs import check_tool_results
from disagg.http.messages_schema import MessagesRequest
from disagg.http.response_store import ResponseStore, ResponseStoreConfig, StoredResponse
from disagg.http.responses_schema import ResponsesRequest, items_to_messages
from disagg.protocol import Request, SamplingParams
from disagg.router.admission import AdmissionConfig, AdmissionQueue, Entry


def test_dynamo_hints_map_onto_our_options():
    hints = read_hints({"greed_sampling": True, "cache_control": {"type": "ephemeral", "ttl": "1h"},
                        "agent_hints": {"priority": 7, "latency_sensitivity": 1.5, "osl": 64,
                                        "speculative_prefill": False}}, None)
    assert (hints.priority, hints.latency_sensitivity_s, hints.expected_output_tokens) == (7, 1.5, 64)
    assert hints.greedy and hints.retention_s == 3600 and hints.ignored == []
    assert read_hints({"agent_hints": {"speculative_prefill": True}}, None).retention_s == RETENTION_DEFAULT_S


def test_kv_hints_envelope_retains_and_ignores_what_it_does_not_know():
    hints = read_hints(None, {"protocol_version": "0.1", "actions": [
        {"action_type": "kv.retain", "ttl_s": 30}, {"action_type": "kv.demote", "ttl_s": 90},
        {"action_type": "kv.fetch"}, "junk"]})
    assert hints.retention_s == 90  # the longest asked for
    assert hints.ignored == [Hint.OTHER, Hint.OTHER]


def test_priority_hint_is_capped_not_refused():
    hints = read_hints({"agent_hints": {"priority": 1000}}, None)
    assert hints.capped_priority(10) == 10 and hints.capped_priority(100) == 100
    assert read_hints({"agent_hints": {"priority": -1000}}, None).capped_priority(0) == -100


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=4)))
def test_any_json_is_read_without_raising(value):
    hints = read_hints(value, value)  # never raises: hints never fail a request
    assert all(isinstance(h, Hint) for h in hints.ignored)


@pytest.mark.parametrize("ttl, seconds", [("600", 600), ("5m", 300), ("1h", 3600), (45, 45), ("2h", 3600),
                                          ("soon", None), (-1, None), (True, None)])
def test_ttl_spellings(ttl, seconds):
    assert ttl_seconds(ttl) == seconds


def _e(rid, tenant, now, head_start=0.0):
    entry = Entry(rid, tenant, 0, 10, now, 1e9)
    entry.head_start_s = head_start
    return entry


def _drain(q):
    out = []
    while (e := q.pop_next(lambda e: True)) is not None:
        out.append(e.request_id)
    return out


def test_latency_sensitivity_reorders_only_its_own_tenants_queue():
    q = AdmissionQueue(AdmissionConfig(), lambda: 0.0)
    q.submit(_e("a1", "a", 0.0))
    q.submit(_e("a2", "a", 1.0))
    q.submit(_e("a3-urgent", "a", 2.0, head_start=5.0))  # counts as arrived at -3.0: ahead of a1 and a2
    q.submit(_e("a4", "a", 3.0, head_start=0.5))  # at 2.5: still behind a2
    assert [e.request_id for e in q._bands[0]["a"]] == ["a3-urgent", "a1", "a2", "a4"]
    q.submit(_e("b1", "b", 4.0))
    order = _drain(q)
    assert order.index("b1") <= 1  # fair share between tenants is untouched: b is served second at the latest
    assert [r for r in order if r.startswith("a")] == ["a3-urgent", "a1", "a2", "a4"]


def test_expected_output_length_is_what_the_load_book_counts():
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=500))
    assert request.output_estimate() == 500
    request.expected_output_tokens = 40
    assert request.output_estimate() == 40
    request.expected_output_tokens = 900
    assert request.output_estimate() == 500  # never past max_tokens


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def _stored(rid, session="s"):
    return StoredResponse.of(rid, session, [{"role": "user", "content": rid}], {"id": rid})


def test_response_store_is_per_tenant_bounded_and_expires():
    clock = Clock()
    store = ResponseStore(ResponseStoreConfig(max_per_tenant=2, ttl_s=10), clock)
    for rid in ("r1", "r2", "r3"):
        store.put("alice", _stored(rid))
    with pytest.raises(NotFound):
        store.get("alice", "r1")  # the oldest went first
    assert store.get("alice", "r3").messages()[0]["content"] == "r3"
    again = StoredResponse.from_wire(store.get("alice", "r3").to_wire())  # what a shared store sends back
    assert (again.messages(), again.body(), again.session) == ([{"role": "user", "content": "r3"}], {"id": "r3"}, "s")
    with pytest.raises(NotFound) as err:
        store.get("bob", "r3")  # another tenant's: the same answer as an unknown id
    assert err.value.code == "response_not_found"
    clock.now = 10.5
    with pytest.raises(NotFound):
        store.get("alice", "r3")
    assert len(store) == 0
    store.put("alice", _stored("r4"))
    store.delete("alice", "r4")
    with pytest.raises(NotFound):
        store.delete("alice", "r4")


def test_response_store_is_bounded_by_bytes_per_tenant():
    store = ResponseStore(ResponseStoreConfig(max_per_tenant=100, max_bytes_per_tenant=3 * _stored("r0").size))
    sizes = []
    for rid in ("r1", "r2", "r3", "r4", "r5"):
        store.put("alice", _stored(rid))
        sizes.append(len(store))
    assert sizes[-1] < 5 and sum(r.size for r in store._by_tenant["alice"].values()) <= store.config.max_bytes_per_tenant
    with pytest.raises(NotFound):
        store.get("alice", "r1")  # the oldest went first
    assert store.get("alice", "r5").messages()[0]["content"] == "r5"
    store.put("bob", _stored("b1"))  # another tenant's budget is its own
    assert store.get("alice", "r5") and store.get("bob", "b1")


def test_responses_items_become_chat_messages():
    body = ResponsesRequest.model_validate({"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}", "id": "fc_1"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "18 C"}]})
    messages = items_to_messages(body.items())
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["content"] == "Checking." and [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]
    check_tool_results(messages, "input", "function_call_output call_id", "function_call")
    with pytest.raises(InvalidRequest, match="'c9'"):
        check_tool_results(messages + [{"role": "tool", "tool_call_id": "c9", "content": ""}], "input", "x", "y")


def test_anthropic_turns_become_chat_messages_and_cache_marks_retention():
    body = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "Be brief.",
                                                   "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [
            {"role": "user", "content": "weather in Rome?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "21 C"},
                                         {"type": "text", "text": "thanks"}]}]})
    assert body.conversation() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "21 C"},
        {"role": "user", "content": "thanks"}]
    assert body.retention_s() == 3600
    plain = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert plain.retention_s() is None
    with pytest.raises(ValueError, match="tool_use blocks cannot be in user turns"):
        MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "w", "input": {}}]}]})
