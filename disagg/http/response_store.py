"""Stored responses for `previous_response_id`: bounded per tenant, with a TTL.  Pure (clock injected).

A stored response keeps the conversation up to and including its own output (chat messages, the template's
form, as JSON text) and the session it belongs to: the id of the first response of the chain.  A follow-up turn
(`previous_response_id`) continues that conversation and that session, so the router sends it where the
conversation's KV already is.  Each tenant holds at most `max_per_tenant` responses (the oldest go first), each for
`ttl_s` after it was stored.  An id stored by another tenant is not found - the same answer as an id that never
existed, so ids leak nothing across tenants.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from disagg.errors import NotFound
from disagg.wire import WireMessage


@dataclass
class ResponseStoreConfig:
    max_per_tenant: int = field(
        default=1024, metadata={"help": "Responses API: stored responses per tenant (the oldest go first)"}
    )
    ttl_s: float = field(default=3600.0, metadata={"help": "Responses API: how long a stored response is kept"})
    max_bytes_per_tenant: int = field(
        default=256 * 2**20,
        metadata={"help": "Responses API: bytes of stored responses per tenant, images included (the oldest go first)"},
    )


@dataclass
class StoredResponse(WireMessage):
    """One stored response; it travels to a shared store as msgpack (the JSON it holds as JSON text)."""

    TYPE: ClassVar[str] = "stored_response"
    response_id: str
    session: str  # the chain's first response id
    conversation: str  # JSON: the chat messages, this response's output included
    response: str  # JSON: the Response object, as GET /v1/responses/{id} returns it
    inputs: str = "[]"  # JSON: this turn's input items, as GET /v1/responses/{id}/input_items lists them
    expires: float = 0.0

    @classmethod
    def of(
        cls,
        response_id: str,
        session: str,
        messages: list[dict[str, Any]],
        body: dict[str, Any],
        inputs: list[dict[str, Any]] | None = None,
    ) -> StoredResponse:
        return cls(response_id, session, json.dumps(messages), json.dumps(body), json.dumps(inputs or []))

    def input_items(self) -> list[dict[str, Any]]:
        return json.loads(self.inputs)

    def messages(self) -> list[dict[str, Any]]:
        return json.loads(self.conversation)

    def body(self) -> dict[str, Any]:
        return json.loads(self.response)

    @property
    def size(self) -> int:
        """Bytes it holds (its conversation keeps its images' data URLs)."""
        return len(self.conversation) + len(self.response) + len(self.inputs)


def not_found(response_id: str, param: str = "previous_response_id") -> NotFound:
    return NotFound(
        f"Response with id '{response_id}' not found (never stored, expired, or not yours).",
        param=param,
        code="response_not_found",
    )


@dataclass
class ResponseStore:
    config: ResponseStoreConfig = field(default_factory=ResponseStoreConfig)
    clock: Callable[[], float] = time.monotonic
    _by_tenant: dict[str, OrderedDict[str, StoredResponse]] = field(default_factory=dict)

    def put(self, tenant: str, stored: StoredResponse) -> None:
        for other in list(self._by_tenant):  # every tenant's expired responses go, idle tenants' too
            self._expire(other)
        stored.expires = self.clock() + self.config.ttl_s
        responses = self._by_tenant.setdefault(tenant, OrderedDict())
        responses[stored.response_id] = stored
        held = sum(r.size for r in responses.values())
        while len(responses) > self.config.max_per_tenant or (held > self.config.max_bytes_per_tenant and responses):
            _, gone = responses.popitem(last=False)
            held -= gone.size

    def get(self, tenant: str, response_id: str, param: str = "previous_response_id") -> StoredResponse:
        self._expire(tenant)
        responses = self._by_tenant.get(tenant)
        found = responses.get(response_id) if responses is not None else None
        if found is None:
            raise not_found(response_id, param)
        return found

    def delete(self, tenant: str, response_id: str, param: str = "response_id") -> None:
        self.get(tenant, response_id, param)
        responses = self._by_tenant[tenant]
        del responses[response_id]
        if not responses:
            del self._by_tenant[tenant]

    def _expire(self, tenant: str) -> None:
        responses = self._by_tenant.get(tenant)
        if responses is None:
            return
        now = self.clock()
        while responses:
            oldest = next(iter(responses.values()))  # stored in time order, so the oldest expires first
            if oldest.expires > now:
                break
            responses.popitem(last=False)
        if not responses:
            del self._by_tenant[tenant]  # no empty entry per tenant that ever stored something

    def __len__(self) -> int:
        return sum(len(r) for r in self._by_tenant.values())


class ResponseStorePort(Protocol):
    """Where the front door keeps responses: in its own process (`LocalResponses`), or in one store that every
    router replica shares (cluster/shared_stores.py)."""

    async def put(self, tenant: str, stored: StoredResponse) -> None: ...

    async def get(self, tenant: str, response_id: str, param: str = "previous_response_id") -> StoredResponse:
        """NotFound naming `param` (the body's previous_response_id, or a path's response_id)."""
        ...

    async def delete(self, tenant: str, response_id: str) -> None: ...  # NotFound


class LocalResponses:
    """The store in the front door's own process (one router)."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store

    async def put(self, tenant: str, stored: StoredResponse) -> None:
        self.store.put(tenant, stored)

    async def get(self, tenant: str, response_id: str, param: str = "previous_response_id") -> StoredResponse:
        return self.store.get(tenant, response_id, param)

    async def delete(self, tenant: str, response_id: str) -> None:
        self.store.delete(tenant, response_id)
