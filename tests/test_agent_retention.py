"""KV kept through tool calls without hints: a session's turn that offers tools (an agent turn) has its KV pinned
in the serving worker's CPU tier when it ends, through every API; a turn without tools, or without a session, is
left to plain LRU; `tool_turn_retention_s=0` turns the default off.  Also here: a Responses or Messages stream whose
worker dies mid-way ends with the API's own error event, never a cut stream.  In-process: the real front door,
router core and one engine worker (default model, CPU tier) on this thread's event loop."""
import json
import time

import pytest
from fastapi.testclient import TestClient

from agentconv import WEATHER_TOOL, weather_conversation
from disagg.engine.tokenizer import Tokenizer
from disagg.http.app import build_app
from disagg.http.config import AgentConfig, ApiConfig
from disagg.http.models import ModelTable
from disagg.kv.tier_config import TierConfig
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore
from tests.fakes import LocalWorkerHandle, local_worker

LOCAL = ("127.0.0.1", 1234)
FLAT_TOOL = {"type": "function", **WEATHER_TOOL["function"]}
ANTHROPIC_TOOL = {"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}


@pytest.fixture(scope="module")
def worker(smollm_dir):
    return local_worker("w", smollm_dir, tiers=TierConfig(cpu_bytes=256 << 20, disk_bytes=0), num_blocks=256,
                        max_model_len=1024)


def _app(worker, smollm_dir, retention_s, handle=None):
    core = RouterCore({}, {"w": handle or LocalWorkerHandle(worker)}, PolicyConfig(seed=0), 16)
    config = ApiConfig(agents=AgentConfig(tool_turn_retention_s=retention_s))
    return build_app(ModelTable.single(smollm_dir.name, core, Tokenizer.from_dir(smollm_dir), 1024), config)


def _pinned(worker, session: str, timeout_s: float = 10.0) -> bool:
    """Whether `session` gets pinned: the pin is taken when the request retires on the engine's thread, which may
    run just after the answer went out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.tiers.is_pinned_session(session):
            return True
        time.sleep(0.02)
    return False


def _turns(model):
    chat = {"model": model, "messages": weather_conversation(), "max_tokens": 24, "temperature": 0}
    return {
        "chat": ("/v1/chat/completions", {**chat, "tools": [WEATHER_TOOL]}, chat),
        "messages": ("/v1/messages",
                     {"model": model, "max_tokens": 8, "temperature": 0, "tools": [ANTHROPIC_TOOL],
                      "messages": [{"role": "user", "content": "What is the weather in Rome?"}]},
                     {"model": model, "max_tokens": 8, "temperature": 0,
                      "messages": [{"role": "user", "content": "What is the weather in Rome?"}]}),
    }


@pytest.mark.parametrize("api", ["chat", "messages"])
def test_an_agent_turn_of_a_session_keeps_its_kv_a_plain_turn_does_not(worker, smollm_dir, api):
    path, with_tools, plain = _turns(smollm_dir.name)[api]
    with TestClient(_app(worker, smollm_dir, 300.0), client=LOCAL) as http:
        assert http.post(path, json=plain, headers={"X-Session-ID": f"{api}-plain"}).status_code == 200
        assert http.post(path, json=with_tools, headers={"X-Session-ID": f"{api}-agent"}).status_code == 200
        assert http.post(path, json=with_tools).status_code == 200  # no session: nothing to pin it under
    assert _pinned(worker, f"{api}-agent")
    assert not worker.tiers.is_pinned_session(f"{api}-plain")  # retired before the agent turn: decided already


def test_a_responses_turn_with_tools_is_pinned_under_its_conversation(worker, smollm_dir):
    body = {"model": smollm_dir.name, "input": "What is the weather in Rome?", "tools": [FLAT_TOOL],
            "max_output_tokens": 8, "temperature": 0}
    with TestClient(_app(worker, smollm_dir, 300.0), client=LOCAL) as http:
        reply = http.post("/v1/responses", json=body)
    assert reply.status_code == 200
    assert _pinned(worker, reply.json()["id"])  # the conversation is the session: its first response's id


def test_the_default_can_be_turned_off(worker, smollm_dir):
    path, with_tools, plain = _turns(smollm_dir.name)["chat"]
    with TestClient(_app(worker, smollm_dir, 0.0), client=LOCAL) as http:
        assert http.post(path, json=with_tools, headers={"X-Session-ID": "off-agent"}).status_code == 200
        # a later pinned request is the condition to wait on: by then the first one had retired
        hinted = {**plain, "kv_retention": {"ttl_s": 60}}
        assert http.post(path, json=hinted, headers={"X-Session-ID": "off-hinted"}).status_code == 200
    assert _pinned(worker, "off-hinted")
    assert not worker.tiers.is_pinned_session("off-agent")


def test_openai_prompt_cache_fields_name_the_session_and_ask_for_retention(worker, smollm_dir):
    path, with_tools, plain = _turns(smollm_dir.name)["chat"]
    with TestClient(_app(worker, smollm_dir, 300.0), client=LOCAL) as http:
        # an agent turn whose session is its prompt_cache_key (OpenAI's name for "these share a prefix")
        assert http.post(path, json={**with_tools, "prompt_cache_key": "pck-agent"}).status_code == 200
        # no tools, but the extended cache retention OpenAI offers: kept too
        body = {**plain, "prompt_cache_key": "pck-24h", "prompt_cache_retention": "24h"}
        assert http.post(path, json=body).status_code == 200
    assert _pinned(worker, "pck-agent") and _pinned(worker, "pck-24h")


@pytest.mark.parametrize("path, body, last", [
    ("/v1/responses", {"input": "Count from one to fifty.", "max_output_tokens": 60}, "response.failed"),
    ("/v1/messages", {"max_tokens": 60, "messages": [{"role": "user", "content": "Count from one to fifty."}]},
     "error"),
])
def test_a_stream_whose_worker_dies_ends_with_the_api_s_error_event(worker, smollm_dir, path, body, last):
    handle = LocalWorkerHandle(worker)
    handle.slow_stream_s = 0.05  # keeps the stream in flight while the worker dies
    events = []
    with TestClient(_app(worker, smollm_dir, 0.0, handle), client=LOCAL) as http:
        with http.stream("POST", path, json={"model": smollm_dir.name, "temperature": 0, "stream": True, **body}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))
                if line.startswith("data: ") and "delta" in events[-1] and not handle.dead:
                    handle.dead = True  # a token went out: now the worker is gone (its next token breaks)
                if line.startswith("data: ") and events[-1] == "error":
                    error = json.loads(line.removeprefix("data: "))
    assert events[-1] == last and "error" in events
    assert not any(e in events for e in ("response.completed", "message_stop"))
    message = error["error"]["message"] if path == "/v1/messages" else error["message"]
    assert message


class _Recording(LocalWorkerHandle):
    """The worker handle that keeps every Request the router sends it."""

    def __init__(self, worker):
        super().__init__(worker)
        self.requests = []

    def generate(self, request, remote):
        self.requests.append(request)
        return super().generate(request, remote)


def test_hints_reach_the_request_the_worker_gets(worker, smollm_dir):
    handle = _Recording(worker)
    hints = {"nvext": {"greed_sampling": True,
                       "agent_hints": {"priority": 7, "osl": 5, "latency_sensitivity": 1.5}},
             "kv_hints": {"actions": [{"action_type": "kv.demote", "ttl_s": 42}]}}
    body = {"model": smollm_dir.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
            "temperature": 0.9, **hints}
    with TestClient(_app(worker, smollm_dir, 0.0, handle), client=LOCAL) as http:
        assert http.post("/v1/chat/completions", json=body, headers={"X-Session-ID": "hinted"}).status_code == 200
        # a priority asked for in the body is the caller's: it wins over the hint
        assert http.post("/v1/chat/completions", json={**body, "priority": -3}).status_code == 200
    first, second = handle.requests
    assert (first.priority, first.expected_output_tokens, first.queue_head_start_s) == (7, 5, 1.5)
    assert first.sampling.temperature == 0.0 and first.kv_retention_s == 42 and first.session_id == "hinted"
    assert first.output_estimate() == 5  # what the load book counts, not max_tokens
    assert second.priority == -3
