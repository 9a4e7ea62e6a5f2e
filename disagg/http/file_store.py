"""Uploaded files (the OpenAI Files API, `/v1/files`): bounded per tenant, each kept until it is deleted or
expires.  Pure (clock injected).

What a file is for here: an image a Responses `input_image` part names by `file_id` instead of sending it again in every
request.  A tenant holds at most `max_per_tenant` files and `max_bytes_per_tenant` bytes, and all tenants together
`max_bytes_total` (without keys a client names its own tenant, so only a total bounds the memory); an upload past any of
them is refused (413 naming the limit), never made room for by dropping older files, which their owners still expect to
name.  Every file expires: at the `expires_after` its uploader asked for, or at `ttl_s`, whichever is sooner.  An id
stored by another tenant is not found - the same answer as an id that never existed, so ids leak nothing across tenants.
The store lives in the front door's memory (or, with router replicas, in one actor they share:
cluster/shared_stores.py); a router that restarts starts with none.
"""

from __future__ import annotations

import dataclasses
import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from disagg.errors import InvalidRequest, NotFound, PayloadTooLarge
from disagg.vision.images import ImageLimits
from disagg.wire import WireMessage


class FilePurpose(str, enum.Enum):
    """The OpenAI purposes this server keeps files for (images for `input_image`); batch, fine-tune and evals
    files are for jobs it does not run (400)."""

    VISION = "vision"
    USER_DATA = "user_data"
    ASSISTANTS = "assistants"


@dataclass
class FileStoreConfig:
    max_file_bytes: int = field(  # files are for images here: as large as an image may be
        default=ImageLimits.max_image_bytes, metadata={"help": "Files API: the largest upload, in bytes (larger: 413)"}
    )
    max_bytes_per_tenant: int = field(
        default=256 * 2**20, metadata={"help": "Files API: bytes of files one tenant may keep (past it: 413)"}
    )
    max_per_tenant: int = field(default=1000, metadata={"help": "Files API: files one tenant may keep (past it: 413)"})
    max_bytes_total: int = field(
        default=1024 * 2**20,
        metadata={"help": "Files API: bytes of files all tenants together may keep (past it: 413)"},
    )
    ttl_s: float = field(
        default=86400.0,
        metadata={"help": "Files API: how long a file is kept at most (an upload's expires_after may ask less)"},
    )


@dataclass
class StoredFile(WireMessage):
    """One uploaded file; it travels to a shared store as msgpack.  Times are Unix seconds (the API shows them)."""

    TYPE: ClassVar[str] = "stored_file"
    file_id: str
    filename: str
    purpose: FilePurpose
    data: bytes  # b"" in a listing or a retrieve's answer (`info`): only /content and `input_image` read bytes
    size: int = 0
    created_at: int = 0
    expires_at: int = 0

    @classmethod
    def new(cls, filename: str, purpose: FilePurpose, data: bytes) -> StoredFile:
        return cls(f"file-{uuid.uuid4().hex}", filename, purpose, data, len(data))

    def info(self) -> StoredFile:
        """The file without its bytes."""
        return dataclasses.replace(self, data=b"")

    def body(self) -> dict[str, Any]:
        """The File object, as POST /v1/files and GET /v1/files/{id} return it."""
        return {
            "id": self.file_id,
            "object": "file",
            "bytes": self.size,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose.value,
            "status": "processed",
        }


def file_not_found(file_id: str, param: str) -> NotFound:
    return NotFound(
        f"No such file: '{file_id}' (never uploaded, expired, deleted, or not yours).",
        param=param,
        code="file_not_found",
    )


@dataclass
class FileStore:
    config: FileStoreConfig = field(default_factory=FileStoreConfig)
    clock: Callable[[], float] = time.time
    _by_tenant: dict[str, dict[str, StoredFile]] = field(default_factory=dict)

    def put(self, tenant: str, stored: StoredFile, expires_after_s: float | None = None) -> StoredFile:
        """Keeps `stored` (its times set here); PayloadTooLarge when it is over a limit."""
        c = self.config
        stored.size = len(stored.data)  # what the limits count: the bytes it holds, whatever it was built with
        if stored.size > c.max_file_bytes:
            raise PayloadTooLarge(
                f"the file is over this server's limit of {c.max_file_bytes} bytes", param="file", code="file_too_large"
            )
        self._expire()
        files = self._by_tenant.get(tenant, {})
        if len(files) >= c.max_per_tenant:
            raise PayloadTooLarge(
                f"this tenant keeps {len(files)} files, this server's limit: delete some first",
                param="file",
                code="file_storage_full",
            )
        held = sum(f.size for f in files.values())
        if held + stored.size > c.max_bytes_per_tenant:
            raise PayloadTooLarge(
                f"this tenant's files would be over this server's limit of {c.max_bytes_per_tenant} bytes: delete "
                "some first",
                param="file",
                code="file_storage_full",
            )
        everyone = sum(f.size for t in self._by_tenant.values() for f in t.values())
        if everyone + stored.size > c.max_bytes_total:
            raise PayloadTooLarge(
                f"this server's files would be over its limit of {c.max_bytes_total} bytes in all: try later",
                param="file",
                code="file_storage_full",
            )
        now = self.clock()
        keep = c.ttl_s if expires_after_s is None else min(c.ttl_s, expires_after_s)
        stored.created_at, stored.expires_at = int(now), int(now + keep)
        self._by_tenant.setdefault(tenant, {})[stored.file_id] = stored
        return stored

    def get(self, tenant: str, file_id: str, param: str = "file_id") -> StoredFile:
        self._expire()
        found = self._by_tenant.get(tenant, {}).get(file_id)
        if found is None:
            raise file_not_found(file_id, param)
        return found

    def listed(self, tenant: str, purpose: FilePurpose | None = None) -> list[StoredFile]:
        """The tenant's files without their bytes, oldest first (uploads are kept in time order)."""
        self._expire()
        files = self._by_tenant.get(tenant, {}).values()
        return [f.info() for f in files if purpose is None or f.purpose == purpose]

    def delete(self, tenant: str, file_id: str) -> None:
        self.get(tenant, file_id)
        files = self._by_tenant[tenant]
        del files[file_id]
        if not files:
            del self._by_tenant[tenant]

    def _expire(self) -> None:
        """Every tenant's expired files go (idle tenants' too); no empty entry is left per tenant."""
        now = self.clock()
        for tenant in list(self._by_tenant):
            files = self._by_tenant[tenant]
            for file_id in [i for i, f in files.items() if f.expires_at <= now]:
                del files[file_id]
            if not files:
                del self._by_tenant[tenant]

    def __len__(self) -> int:
        self._expire()
        return sum(len(f) for f in self._by_tenant.values())


def page(files: list[StoredFile], *, order: str, limit: int, after: str) -> dict[str, Any]:
    """OpenAI's list of files: `order` asc / desc by creation, up to `limit`, after the file id `after`."""
    ordered = files[::-1] if order == "desc" else files
    ids = [f.file_id for f in ordered]
    if after and after not in ids:
        raise InvalidRequest(f"after: no file {after!r}", param="after")
    start = ids.index(after) + 1 if after else 0
    chosen = ordered[start : start + limit]
    first, last = (chosen[0].file_id, chosen[-1].file_id) if chosen else (None, None)
    more = start + len(chosen) < len(ordered)
    return {"object": "list", "data": [f.body() for f in chosen], "first_id": first, "last_id": last, "has_more": more}


class FileStorePort(Protocol):
    """Where the front door keeps files: in its own process (`LocalFiles`), or in one store that every router
    replica shares (cluster/shared_stores.py)."""

    async def put(self, tenant: str, stored: StoredFile, expires_after_s: float | None) -> StoredFile:
        """The stored file's `info` (PayloadTooLarge past a limit)."""
        ...

    async def get(self, tenant: str, file_id: str, param: str = "file_id") -> StoredFile:
        """The file with its bytes; NotFound naming `param` (a path's file_id, or the request part that named it)."""
        ...

    async def info(self, tenant: str, file_id: str, param: str = "file_id") -> StoredFile: ...  # no bytes; NotFound

    async def listed(self, tenant: str, purpose: FilePurpose | None) -> list[StoredFile]: ...

    async def delete(self, tenant: str, file_id: str) -> None: ...  # NotFound


class LocalFiles:
    """The store in the front door's own process (one router)."""

    def __init__(self, store: FileStore) -> None:
        self.store = store

    async def put(self, tenant: str, stored: StoredFile, expires_after_s: float | None) -> StoredFile:
        return self.store.put(tenant, stored, expires_after_s).info()

    async def get(self, tenant: str, file_id: str, param: str = "file_id") -> StoredFile:
        return self.store.get(tenant, file_id, param)

    async def info(self, tenant: str, file_id: str, param: str = "file_id") -> StoredFile:
        return self.store.get(tenant, file_id, param).info()

    async def listed(self, tenant: str, purpose: FilePurpose | None) -> list[StoredFile]:
        return self.store.listed(tenant, purpose)

    async def delete(self, tenant: str, file_id: str) -> None:
        self.store.delete(tenant, file_id)
