"""Stored responses for `previous_response_id`: bounded per tenant, with a TTL.  Pure (clock injected).

A stored response keeps the conversation up to and including its own output (chat messages, the template's
form) and the session it belongs to: the id of the first response of the chain.  A follow-up turn
(`previous_response_id`) continues that conversation and that session, so the router sends it where the
conversation's KV already is.  Each tenant holds at most `max_per_tenant` responses (the oldest go first), each for
`ttl_s` after it was stored.  An id stored by another tenant is not found - the same answer as an id that never
existed, so ids leak nothing across tenants.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from disagg.errors import NotFound


@dataclass
class ResponseStoreConfig:
    max_per_tenant: int = field(
        default=1024, metadata={"help": "Responses API: stored responses per tenant (the oldest go first)"}
    )
    ttl_s: float = field(default=3600.0, metadata={"help": "Responses API: how long a stored response is kept"})


@dataclass
class StoredResponse:
    response_id: str
    session: str  # the chain's first response id
    messages: list[dict[str, Any]]  # the conversation, this response's output included
    body: dict[str, Any]  # the Response object, as GET /v1/responses/{id} returns it
    expires: float = 0.0


@dataclass
class ResponseStore:
    config: ResponseStoreConfig = field(default_factory=ResponseStoreConfig)
    clock: Callable[[], float] = time.monotonic
    _by_tenant: dict[str, OrderedDict[str, StoredResponse]] = field(default_factory=dict)

    def put(self, tenant: str, stored: StoredResponse) -> None:
        stored.expires = self.clock() + self.config.ttl_s
        responses = self._by_tenant.setdefault(tenant, OrderedDict())
        responses[stored.response_id] = stored
        self._expire(responses)
        while len(responses) > self.config.max_per_tenant:
            responses.popitem(last=False)

    def get(self, tenant: str, response_id: str) -> StoredResponse:
        responses = self._by_tenant.get(tenant)
        if responses is not None:
            self._expire(responses)
            found = responses.get(response_id)
            if found is not None:
                return found
        raise NotFound(
            f"Response with id '{response_id}' not found (never stored, expired, or not yours).",
            param="previous_response_id",
            code="response_not_found",
        )

    def delete(self, tenant: str, response_id: str) -> None:
        self.get(tenant, response_id)
        del self._by_tenant[tenant][response_id]

    def _expire(self, responses: OrderedDict[str, StoredResponse]) -> None:
        now = self.clock()
        while responses:
            oldest = next(iter(responses.values()))  # stored in time order, so the oldest expires first
            if oldest.expires > now:
                break
            responses.popitem(last=False)

    def __len__(self) -> int:
        return sum(len(r) for r in self._by_tenant.values())
