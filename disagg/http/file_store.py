"""Uploaded files (`/v1/files`: OpenAI's Files API, and Anthropic's to an Anthropic client - the two shapes of the
same files are http/file_shapes.py's): bounded per tenant, each kept until it is deleted or expires.  Pure (clock
injected).

What a file is for here: an image a Responses `input_image` part or a Messages image block names by its id instead of
sending it again in every request.  A tenant holds at most `max_per_tenant` files and `max_bytes_per_tenant` bytes, and
all tenants together `max_bytes_total` (without keys a client names its own tenant, so only a total bounds the
memory); an upload past any of them is refused (413 naming the limit), never made room for by dropping older files,
which their owners still expect to name.  Every file expires: at the `expires_after` its uploader asked for, or at
`ttl_s`, whichever is sooner.  An id stored by another tenant is not found - the same answer as an id that never
existed, so ids leak nothing across tenants.  The store lives in the front door's memory (or, with router replicas, in
one actor they share: cluster/shared_stores.py); a router that restarts starts with none.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from disagg.errors import NotFound, PayloadTooLarge
from disagg.vision.images import ImageLimits
from disagg.wire import WireMessage

OCTET_STREAM = "application/octet-stream"
# a declared media type kept as metadata: type/subtype, no parameters (anything else is kept as OCTET_STREAM)
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,62}/[a-z0-9][a-z0-9!#$&^_.+-]{0,62}")
# the image formats the engine's front door decodes (disagg/vision/images.py), by their first bytes
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


def image_mime(data: bytes) -> str | None:
    """The image type of `data` from its first bytes (None: not an image the engine decodes)."""
    mime = next((m for head, m in _SIGNATURES if data.startswith(head)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    return mime


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
    mime_type: str = OCTET_STREAM  # an image's from its bytes, else what its upload declared (metadata only)
    seq: int = 0  # its place in the store's order of uploads (the store sets it): what list cursors name

    @classmethod
    def new(cls, filename: str, purpose: FilePurpose, data: bytes, declared: str = "") -> StoredFile:
        declared = declared.split(";")[0].strip().lower()  # its parameters (a charset) are not kept
        declared = declared if _MEDIA_TYPE.fullmatch(declared) else ""
        mime = image_mime(data) or declared or OCTET_STREAM
        return cls(f"file-{uuid.uuid4().hex}", filename, purpose, data, len(data), mime_type=mime)

    def info(self) -> StoredFile:
        """The file without its bytes."""
        return dataclasses.replace(self, data=b"")


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
    _seq: int = 0  # uploads so far (StoredFile.seq)

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
        self._seq += 1
        stored.seq = self._seq
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
