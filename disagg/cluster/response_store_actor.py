"""The Responses API's store shared by router replicas: one small Ray actor holds the pure ResponseStore
(http/response_store.py), and each replica reaches it through `RayResponses`, the store port's Ray side.  With
one router the store stays in the router's process (http/response_store.py's LocalResponses); with replicas a
follow-up turn (`previous_response_id`) finds its conversation whichever replica Serve's proxy picks.

Stored responses travel as msgpack (`StoredResponse.to_wire`); a miss comes back as None and becomes the same
NotFound the local store raises.  The actor is created and killed by the replicas' front (cluster/replicas.py).
"""

from __future__ import annotations

from typing import Any

import ray

from disagg.errors import NotFound, ServiceUnavailable
from disagg.http.response_store import ResponseStore, ResponseStoreConfig, StoredResponse, not_found


@ray.remote(num_cpus=0)
class ResponseStoreActor:
    def __init__(self, max_per_tenant: int, ttl_s: float) -> None:
        self.store = ResponseStore(ResponseStoreConfig(max_per_tenant=max_per_tenant, ttl_s=ttl_s))

    def put(self, tenant: str, stored: bytes) -> None:
        self.store.put(tenant, StoredResponse.from_wire(stored))

    def get(self, tenant: str, response_id: str) -> bytes | None:
        try:
            return self.store.get(tenant, response_id).to_wire()
        except NotFound:
            return None

    def delete(self, tenant: str, response_id: str) -> bool:
        try:
            self.store.delete(tenant, response_id)
        except NotFound:
            return False
        return True


def start_store(name: str, config: ResponseStoreConfig, resources: dict[str, float] | None = None) -> Any:
    """The shared store's actor, named so replicas find it (`ray.get_actor(name)`)."""
    actor = ResponseStoreActor.options(name=name, resources=resources or {})  # type: ignore[attr-defined]
    return actor.remote(config.max_per_tenant, config.ttl_s)


class RayResponses:
    """The store port over the shared actor (a replica's side)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def _call(self, method: str, *args: str | bytes) -> Any:
        try:
            return await getattr(self.actor, method).remote(*args)
        except ray.exceptions.RayError as exc:  # the store's process is gone: an explicit 503, never a hang
            raise ServiceUnavailable(
                f"the response store is unavailable ({type(exc).__name__})", code="response_store_unavailable"
            ) from exc

    async def put(self, tenant: str, stored: StoredResponse) -> None:
        await self._call("put", tenant, stored.to_wire())

    async def get(self, tenant: str, response_id: str, param: str = "previous_response_id") -> StoredResponse:
        payload = await self._call("get", tenant, response_id)
        if payload is None:
            raise not_found(response_id, param)
        return StoredResponse.from_wire(payload)

    async def delete(self, tenant: str, response_id: str) -> None:
        if not await self._call("delete", tenant, response_id):
            raise not_found(response_id, "response_id")
