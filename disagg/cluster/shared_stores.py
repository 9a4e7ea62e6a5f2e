"""The stores router replicas share: one small Ray actor holds the Responses API's stored responses
(http/response_store.py) and the Files API's uploads (http/file_store.py), and each replica reaches them through
`RayResponses` and `RayFiles`, the store ports' Ray sides.  With one router the stores stay in the router's process
(`LocalResponses`, `LocalFiles`); with replicas a follow-up turn (`previous_response_id`) finds its conversation, and an
`input_image` its `file_id`, whichever replica Serve's proxy picks.

Stored responses and files travel as msgpack (`to_wire`); a miss comes back as None and becomes the same NotFound the
local stores raise; an upload over a limit comes back as its refusal (`FilePut`), raised again as the same 413.  Files
travel with their bytes only where bytes are read (/content, an `input_image`).  The actor is created and killed by the
replicas' front (cluster/replicas.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import ray

from disagg.errors import NotFound, PayloadTooLarge, ServiceUnavailable
from disagg.http.file_store import FilePurpose, FileStore, FileStoreConfig, StoredFile, file_not_found
from disagg.http.response_store import ResponseStore, ResponseStoreConfig, StoredResponse, not_found
from disagg.wire import WireMessage


@dataclass
class FilePut(WireMessage):
    """The shared store's answer to an upload: the stored file's info, or the refusal (a limit's message, code)."""

    TYPE: ClassVar[str] = "file_put"
    stored: StoredFile | None
    refused: str = ""
    code: str = ""


class SharedStores:
    """What the shared actor runs (`SharedStoresActor`); a plain class, so tests drive it without Ray.  Files
    come out without their bytes except through `get_file` (a listing or a retrieve moves no image data)."""

    def __init__(self, responses: dict[str, float], files: dict[str, float]) -> None:
        self.responses = ResponseStore(ResponseStoreConfig(**responses))  # type: ignore[arg-type]  # its fields
        self.files = FileStore(FileStoreConfig(**files))  # type: ignore[arg-type]

    def put_response(self, tenant: str, stored: bytes) -> None:
        self.responses.put(tenant, StoredResponse.from_wire(stored))

    def get_response(self, tenant: str, response_id: str) -> bytes | None:
        try:
            return self.responses.get(tenant, response_id).to_wire()
        except NotFound:
            return None

    def delete_response(self, tenant: str, response_id: str) -> bool:
        try:
            self.responses.delete(tenant, response_id)
        except NotFound:
            return False
        return True

    def put_file(self, tenant: str, stored: bytes, expires_after_s: float | None) -> bytes:
        try:
            kept = self.files.put(tenant, StoredFile.from_wire(stored), expires_after_s)
        except PayloadTooLarge as exc:
            return FilePut(None, exc.message, exc.code or "").to_wire()
        return FilePut(kept.info()).to_wire()

    def get_file(self, tenant: str, file_id: str, with_data: bool) -> bytes | None:
        try:
            found = self.files.get(tenant, file_id)
        except NotFound:
            return None
        return (found if with_data else found.info()).to_wire()

    def list_files(self, tenant: str, purpose: str | None) -> list[bytes]:
        chosen = FilePurpose(purpose) if purpose is not None else None
        return [f.to_wire() for f in self.files.listed(tenant, chosen)]

    def delete_file(self, tenant: str, file_id: str) -> bool:
        try:
            self.files.delete(tenant, file_id)
        except NotFound:
            return False
        return True


SharedStoresActor = ray.remote(num_cpus=0)(SharedStores)


def start_stores(
    name: str, responses: ResponseStoreConfig, files: FileStoreConfig, resources: dict[str, float] | None = None
) -> Any:
    """The shared stores' actor, named so replicas find it (`ray.get_actor(name)`)."""
    actor = SharedStoresActor.options(name=name, resources=resources or {})  # type: ignore[attr-defined]
    return actor.remote(dataclasses.asdict(responses), dataclasses.asdict(files))


async def _call(actor: Any, method: str, *args: Any) -> Any:
    try:
        return await getattr(actor, method).remote(*args)
    except ray.exceptions.RayError as exc:  # the stores' process is gone: an explicit 503, never a hang
        raise ServiceUnavailable(
            f"the shared store is unavailable ({type(exc).__name__})", code="store_unavailable"
        ) from exc


class RayResponses:
    """The response store port over the shared actor (a replica's side)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def put(self, tenant: str, stored: StoredResponse) -> None:
        await _call(self.actor, "put_response", tenant, stored.to_wire())

    async def get(self, tenant: str, response_id: str, param: str = "previous_response_id") -> StoredResponse:
        payload = await _call(self.actor, "get_response", tenant, response_id)
        if payload is None:
            raise not_found(response_id, param)
        return StoredResponse.from_wire(payload)

    async def delete(self, tenant: str, response_id: str) -> None:
        if not await _call(self.actor, "delete_response", tenant, response_id):
            raise not_found(response_id, "response_id")


class RayFiles:
    """The file store port over the shared actor (a replica's side)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def put(self, tenant: str, stored: StoredFile, expires_after_s: float | None) -> StoredFile:
        answer = FilePut.from_wire(await _call(self.actor, "put_file", tenant, stored.to_wire(), expires_after_s))
        if answer.stored is None:  # refused over a limit
            raise PayloadTooLarge(answer.refused, param="file", code=answer.code or None)
        return answer.stored

    async def get(self, tenant: str, file_id: str, param: str = "file_id") -> StoredFile:
        return await self._get(tenant, file_id, param, with_data=True)

    async def info(self, tenant: str, file_id: str, param: str = "file_id") -> StoredFile:
        return await self._get(tenant, file_id, param, with_data=False)

    async def _get(self, tenant: str, file_id: str, param: str, *, with_data: bool) -> StoredFile:
        payload = await _call(self.actor, "get_file", tenant, file_id, with_data)
        if payload is None:
            raise file_not_found(file_id, param)
        return StoredFile.from_wire(payload)

    async def listed(self, tenant: str, purpose: FilePurpose | None) -> list[StoredFile]:
        chosen = purpose.value if purpose is not None else None
        return [StoredFile.from_wire(p) for p in await _call(self.actor, "list_files", tenant, chosen)]

    async def delete(self, tenant: str, file_id: str) -> None:
        if not await _call(self.actor, "delete_file", tenant, file_id):
            raise file_not_found(file_id, "file_id")
