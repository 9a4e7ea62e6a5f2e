"""An in-process SSE client for the resume tests: router replicas over shared in-process workers, and a raw ASGI
call that can break its connection after any event (tests/test_resume.py, tests/test_resume_agents.py)."""
import asyncio
import json
from dataclasses import dataclass, field

from disagg.http.app import build_app
from disagg.http.config import ApiConfig
from disagg.http.models import ModelTable
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore
from tests.fakes import LocalWorkerHandle


class Replica:
    """One router process: its own core, app and handles over workers shared with the other replicas."""

    def __init__(self, workers, tokenizer, **api):
        self.handles = {name: LocalWorkerHandle(w) for name, w in workers.items()}
        self.core = RouterCore({}, self.handles, PolicyConfig(kind="round_robin", seed=0), 16)
        self.app = build_app(ModelTable.single("m", self.core, tokenizer, 512), ApiConfig(**api))

    def kill(self):
        for handle in self.handles.values():
            handle.relay_alive = False


@dataclass
class Reply:
    status: int = 0
    events: list = field(default_factory=list)  # (event id, data) per SSE event
    raw: bytes = b""

    @property
    def chunks(self):
        return [json.loads(data) for _, data in self.events if data != "[DONE]"]

    @property
    def choices(self):
        return [c["choices"] for c in self.chunks]

    @property
    def last_id(self):
        return self.events[-1][0]

    def json(self):
        return json.loads(self.raw)


async def call(app, body, headers=None, cut_after=None, cut_after_s=None, on_event=None, path="/v1/completions"):
    """POST `body` to the ASGI app; with `cut_after` (events) or `cut_after_s`, the connection breaks."""
    reply, cut, sent = Reply(), asyncio.Event(), []
    if cut_after_s is not None:
        asyncio.get_running_loop().call_later(cut_after_s, cut.set)

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await cut.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if cut.is_set():
            raise OSError("the connection is gone")
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            return
        reply.raw += message.get("body", b"")
        while b"\n\n" in reply.raw:
            block, reply.raw = reply.raw.split(b"\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.decode().split("\n"))
            reply.events.append((fields.get("id"), fields["data"]))  # typed events: their type is in the data too
            if on_event is not None:
                on_event(reply)
            if cut_after is not None and len(reply.events) >= cut_after:
                cut.set()

    headers = {"content-type": "application/json", **(headers or {})}
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    try:
        await app(scope, receive, send)
    except Exception:  # the app writing to the broken connection (an OSError, perhaps in an exception group)
        if not cut.is_set():
            raise
    await asyncio.sleep(0.02)  # the app's cleanup after a cut (stream closed, abort or orphan)
    return reply
