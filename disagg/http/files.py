"""The OpenAI Files API: `POST /v1/files` (a multipart upload: `file`, `purpose`, optional `expires_after`),
`GET /v1/files` (a page, newest first by default), `GET /v1/files/{id}`, `GET /v1/files/{id}/content` and
`DELETE /v1/files/{id}`; each caller sees its own tenant's files only (http/file_store.py).

What uses them: a Responses `input_image` part that names a `file_id` (`inline_files`) - the upload becomes the
part's data URL before the request is served, so an image sent once by file and an image sent inline give the same
prompt, hence the same tokens, and a stored conversation keeps its own copy (a follow-up still sees the image after
the file is deleted).

An upload's size is checked from its Content-Length before any of it is read or spooled (413 naming the limit);
one without a Content-Length is a 400; the form holds one file and a few fields at most.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query
from fastapi import Request as HTTPRequest
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from disagg.errors import InvalidRequest, PayloadTooLarge
from disagg.http.file_store import FilePurpose, FileStoreConfig, FileStorePort, StoredFile, page
from disagg.http.images import check_image_count
from disagg.http.models import ServedModel
from disagg.http.responses_schema import FunctionCallItem, FunctionCallOutputItem, InputImage, MessageItem
from disagg.vision.images import ImageLimits, too_large

FORM_OVERHEAD = 64 * 1024  # a multipart body's boundaries and small fields, beyond the file's own bytes
MAX_FORM_FIELDS = 8  # file, purpose, expires_after[anchor], expires_after[seconds]: room, not a parser's default
MAX_FILENAME = 255
EXPIRES_AFTER_S = (3600, 30 * 86400)  # OpenAI's bounds on expires_after[seconds]
MAX_LISTED = 10_000  # OpenAI's largest page
# the image formats the engine's front door decodes (disagg/vision/images.py), by their first bytes
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))

Item = MessageItem | FunctionCallItem | FunctionCallOutputItem


def _purpose(value: object) -> FilePurpose:
    try:
        return FilePurpose(value)
    except ValueError:
        kept = ", ".join(p.value for p in FilePurpose)
        raise InvalidRequest(
            f"purpose {value!r}: this server keeps files for {kept} (it runs no batch, fine-tune or eval jobs)",
            param="purpose",
        ) from None


def _expires_after(anchor: object, seconds: object) -> float | None:
    if anchor is None and seconds is None:
        return None
    low, high = EXPIRES_AFTER_S
    if anchor != "created_at":
        raise InvalidRequest("expires_after[anchor] must be 'created_at'", param="expires_after.anchor")
    try:
        value = int(str(seconds))
    except ValueError:
        value = -1
    if not low <= value <= high:
        raise InvalidRequest(
            f"expires_after[seconds] must be an integer from {low} to {high}", param="expires_after.seconds"
        )
    return float(value)


async def _upload(http: HTTPRequest, limits: FileStoreConfig) -> tuple[StoredFile, float | None]:
    """The uploaded file and its expiry from a multipart body, its size checked before it is read."""
    length = http.headers.get("content-length")
    if length is None or not length.isdigit():
        raise InvalidRequest("an upload needs a Content-Length header", param="file", code="length_required")
    if int(length) > limits.max_file_bytes + FORM_OVERHEAD:
        raise PayloadTooLarge(
            f"the upload is over this server's limit of {limits.max_file_bytes} bytes per file",
            param="file",
            code="file_too_large",
        )
    content_type = http.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("an upload is a multipart/form-data body (file, purpose)", param="file")
    async with http.form(max_files=1, max_fields=MAX_FORM_FIELDS) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("the form has no file part named 'file'", param="file")
        purpose = _purpose(form.get("purpose"))
        expires = _expires_after(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
        data = await upload.read(limits.max_file_bytes + 1)
        name = (upload.filename or "upload")[:MAX_FILENAME]
    return StoredFile.new(name, purpose, data), expires


def add_files_routes(app: FastAPI, files: FileStorePort, limits: FileStoreConfig) -> None:
    @app.post("/v1/files")
    async def create(http: HTTPRequest):
        stored, expires = await _upload(http, limits)
        return (await files.put(http.state.caller.tenant, stored, expires)).body()

    @app.get("/v1/files")
    async def listing(
        http: HTTPRequest,
        purpose: str | None = None,
        order: Literal["asc", "desc"] = "desc",
        limit: Annotated[int, Query(ge=1, le=MAX_LISTED)] = MAX_LISTED,
        after: str = "",
    ):
        chosen = _purpose(purpose) if purpose is not None else None
        kept = await files.listed(http.state.caller.tenant, chosen)
        return page(kept, order=order, limit=limit, after=after)

    @app.get("/v1/files/{file_id}")
    async def retrieve(file_id: str, http: HTTPRequest):
        return (await files.info(http.state.caller.tenant, file_id)).body()

    @app.get("/v1/files/{file_id}/content")
    async def content(file_id: str, http: HTTPRequest):
        found = await files.get(http.state.caller.tenant, file_id)
        return Response(found.data, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete(file_id: str, http: HTTPRequest):
        await files.delete(http.state.caller.tenant, file_id)
        return {"id": file_id, "object": "file", "deleted": True}


def _data_url(data: bytes, param: str) -> str:
    mime = next((m for head, m in _SIGNATURES if data.startswith(head)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        raise InvalidRequest("the file is not an image (PNG, JPEG, GIF or WebP)", param=param, code="invalid_image")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def inline_files(
    items: list[Item], files: FileStorePort, tenant: str, served: ServedModel, limits: ImageLimits, *, earlier: int = 0
) -> list[Item]:
    """`items` with every `input_image` that names a `file_id` given that upload's data URL (the `file_id` kept,
    so the input items list it as sent).  Before any file is read: the model takes images and the request's images
    are within the count limit (with the `earlier` images of the stored conversation it continues); a file over
    the image byte limit is refused from its size (413).  A file named twice is read once.  NotFound (404) for a
    file that is not this tenant's, naming the part."""
    images = [p for item in items if isinstance(item, MessageItem) for p in item.parts() if isinstance(p, InputImage)]
    check_image_count(earlier + len(images), served, limits, "input")
    urls: dict[str, str] = {}
    out: list[Item] = []
    for i, item in enumerate(items):
        if not isinstance(item, MessageItem) or isinstance(item.content, str):
            out.append(item)
            continue
        parts: list[Any] = []
        for j, part in enumerate(item.content):
            if isinstance(part, InputImage) and part.file_id is not None:
                param = f"input[{i}].content[{j}].file_id"
                if part.file_id not in urls:
                    urls[part.file_id] = await _file_url(files, tenant, part.file_id, limits, param)
                part = part.model_copy(update={"image_url": urls[part.file_id]})
            parts.append(part)
        out.append(item.model_copy(update={"content": parts}))
    return out


async def _file_url(files: FileStorePort, tenant: str, file_id: str, limits: ImageLimits, param: str) -> str:
    if (await files.info(tenant, file_id, param)).size > limits.max_image_bytes:
        raise too_large(limits, param)
    return _data_url((await files.get(tenant, file_id, param)).data, param)
