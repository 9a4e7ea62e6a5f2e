"""A body that fails validation gets a 400 that names what is wrong where the client put it: of a union's branches,
the one that got furthest into the body (an input item of an unknown type says so, not "input should be a valid
string"), with pydantic's branch labels ("str", "list[tagged-union[...]]", a tag) left out of the path."""
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from disagg.http.errors import install_error_handlers
from disagg.http.messages_schema import MessagesRequest
from disagg.http.responses_schema import ResponsesRequest
from disagg.http.schemas import ChatCompletionRequest


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest):
        return {}

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest):
        return {}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        return {}
    return TestClient(app)


@pytest.mark.parametrize("items, param, says", [
    ([{"type": "bogus"}], "input.0", "'bogus'"),  # the unknown tag is named
    ([{"type": "function_call_output", "output": "1"}], "input.0.call_id", "required"),
    ([{"type": "message", "role": "user", "content": 5}], "input.0.content", "valid"),
    (7, "input", "valid string"),
])
def test_a_responses_input_error_names_the_item_and_field(client, items, param, says):
    reply = client.post("/v1/responses", json={"model": "m", "input": items})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert says in error["message"] and "tagged-union" not in error["message"], error


def test_a_messages_error_is_in_anthropic_s_shape_with_the_same_path(client):
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "bogus"}]}]}
    reply = client.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    assert reply.status_code == 400 and reply.json()["type"] == "error", reply.text
    message = reply.json()["error"]["message"]
    assert message.startswith("messages.0.content.0: ") and "'bogus'" in message, message


@pytest.mark.parametrize("block, path", [
    ({"type": "text", "text": "hi", "foo": 1}, "messages.0.content.0.foo"),  # the tag "text" is also a field
    ({"type": "text", "text": "hi", "cache_control": {"type": "forever"}}, "messages.0.content.0.cache_control"),
    ({"type": "image", "source": {"type": "url", "url": "https://x/y.png", "extra": 1}},
     "messages.0.content.0.source.extra"),
])
def test_a_tag_named_like_a_field_is_not_taken_for_the_field(client, block, path):
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [block]}]}
    reply = client.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"].startswith(path), reply.json()


def test_a_field_named_like_its_object_s_type_is_still_the_field(client):
    """A tool's `type` is "function" and it has a `function` field: no union tag there, the field is the path."""
    tool = {"type": "function", "function": {"name": "f", "type": "x"}}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "tools.0.function.type", reply.json()
