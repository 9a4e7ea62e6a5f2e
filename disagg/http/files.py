"""The Files API: `POST /v1/files` (a multipart upload: `file`, `purpose`, optional `expires_after`),
`GET /v1/files` (a page, newest first by default), `GET /v1/files/{id}`, `GET /v1/files/{id}/content` and
`DELETE /v1/files/{id}`; each caller sees its own tenant's files only (http/file_store.py).  OpenAI's, and
Anthropic's to an Anthropic client (its `anthropic-version` header): the same files and paths, its form (`file`,
optional `expires_in_seconds`), its shapes (http/file_shapes.py: metadata, pages by cursor or by `ids`) and errors.

What uses them: images named by file - a Responses `input_image` part's `file_id`, a Messages image block's `file`
source, a chat `file` part (http/file_images.py).  A file's content is served back as bytes (or as the image it is),
never as the type its uploader declared.

An upload's size is checked from its Content-Length before any of it is read or spooled (413 naming the limit);
one without a Content-Length is a 400; the form holds one file and a few fields at most.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query
from fastapi import Request as HTTPRequest
from fastapi.responses import Response
from starlette.datastructures import FormData, UploadFile

from disagg.errors import InvalidRequest, PayloadTooLarge
from disagg.http.errors import Dialect, dialect_of
from disagg.http.file_shapes import (
    anthropic_by_ids,
    anthropic_deleted,
    anthropic_file,
    anthropic_page,
    openai_file,
    openai_page,
)
from disagg.http.file_store import OCTET_STREAM, FilePurpose, FileStoreConfig, FileStorePort, StoredFile, image_mime

FORM_OVERHEAD = 64 * 1024  # a multipart body's boundaries and small fields, beyond the file's own bytes
MAX_FORM_FIELDS = 8  # file, purpose, expires_after[anchor], expires_after[seconds] (or Anthropic's file,
# expires_in_seconds): room, not a parser's default
MAX_FILENAME = 255
EXPIRES_AFTER_S = (3600, 30 * 86400)  # OpenAI's bounds on expires_after[seconds]
EXPIRES_IN_S = (3600, 90 * 86400)  # Anthropic's bounds on expires_in_seconds
MAX_LISTED = 10_000  # OpenAI's largest page
ANTHROPIC_PAGE = (20, 1000)  # Anthropic's default and largest page


def _purpose(value: object) -> FilePurpose:
    try:
        return FilePurpose(value)
    except ValueError:
        kept = ", ".join(p.value for p in FilePurpose)
        raise InvalidRequest(
            f"purpose {value!r}: this server keeps files for {kept} (it runs no batch, fine-tune or eval jobs)",
            param="purpose",
        ) from None


def _seconds(value: object, bounds: tuple[int, int], message: str, param: str) -> float:
    try:
        seconds = int(str(value))
    except ValueError:
        seconds = -1
    low, high = bounds
    if not low <= seconds <= high:
        raise InvalidRequest(f"{message} must be an integer from {low} to {high}", param=param)
    return float(seconds)


def _expires_after(anchor: object, seconds: object) -> float | None:
    """OpenAI's `expires_after[anchor]` and `expires_after[seconds]`."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("expires_after[anchor] must be 'created_at'", param="expires_after.anchor")
    return _seconds(seconds, EXPIRES_AFTER_S, "expires_after[seconds]", "expires_after.seconds")


def _form_terms(form: FormData, dialect: Dialect) -> tuple[FilePurpose, float | None]:
    """The purpose and expiry an upload's form asks for: OpenAI's fields, or Anthropic's (no purpose; files there
    are the user's data)."""
    if dialect is Dialect.ANTHROPIC:
        seconds = form.get("expires_in_seconds")
        expires = (
            None if seconds is None else _seconds(seconds, EXPIRES_IN_S, "expires_in_seconds", "expires_in_seconds")
        )
        return FilePurpose.USER_DATA, expires
    expires = _expires_after(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
    return _purpose(form.get("purpose")), expires


async def _upload(http: HTTPRequest, limits: FileStoreConfig, dialect: Dialect) -> tuple[StoredFile, float | None]:
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
        purpose, expires = _form_terms(form, dialect)
        data = await upload.read(limits.max_file_bytes + 1)
        name = (upload.filename or "upload")[:MAX_FILENAME]
        declared = upload.content_type or ""
    return StoredFile.new(name, purpose, data, declared), expires


def add_files_routes(app: FastAPI, files: FileStorePort, limits: FileStoreConfig) -> None:
    """The routes of both APIs: each answers in the caller's dialect (an Anthropic client's `anthropic-version`)."""

    def anthropic(http: HTTPRequest) -> bool:
        return dialect_of(http.url.path, http.headers) is Dialect.ANTHROPIC

    def shown(http: HTTPRequest, stored: StoredFile) -> dict[str, Any]:
        return anthropic_file(stored) if anthropic(http) else openai_file(stored)

    @app.post("/v1/files")
    async def create(http: HTTPRequest):
        stored, expires = await _upload(http, limits, dialect_of(http.url.path, http.headers))
        return shown(http, await files.put(http.state.caller.tenant, stored, expires))

    @app.get("/v1/files")
    async def listing(
        http: HTTPRequest,
        purpose: str | None = None,
        order: Literal["asc", "desc"] = "desc",
        limit: Annotated[int | None, Query(ge=1, le=MAX_LISTED)] = None,
        after: str = "",
        page: str = "",
        after_id: str = "",
        scope_id: str | None = None,
    ):
        if anthropic(http):
            kept = await files.listed(http.state.caller.tenant, None)
            if scope_id is not None:  # files of a session's scope: an upload here belongs to none
                kept = []
            ids = http.query_params.getlist("ids[]") + http.query_params.getlist("ids")
            if ids:
                return anthropic_by_ids(kept, ids, paged=bool(page or limit is not None))
            default, largest = ANTHROPIC_PAGE
            if limit is not None and limit > largest:
                raise InvalidRequest(f"limit must be at most {largest}", param="limit")
            return anthropic_page(kept, limit=limit or default, page=page, after_id=after_id)
        chosen = _purpose(purpose) if purpose is not None else None
        kept = await files.listed(http.state.caller.tenant, chosen)
        return openai_page(kept, order=order, limit=limit or MAX_LISTED, after=after)

    @app.get("/v1/files/{file_id}")
    async def retrieve(file_id: str, http: HTTPRequest):
        return shown(http, await files.info(http.state.caller.tenant, file_id))

    @app.get("/v1/files/{file_id}/content")
    async def content(file_id: str, http: HTTPRequest):
        found = await files.get(http.state.caller.tenant, file_id)
        # served as what its bytes are (an image), never as the type its uploader declared: an upload declared
        # text/html must not become a page on this server's origin
        headers = {"X-Content-Type-Options": "nosniff", "Content-Disposition": "attachment"}
        return Response(found.data, media_type=image_mime(found.data) or OCTET_STREAM, headers=headers)

    @app.delete("/v1/files/{file_id}")
    async def delete(file_id: str, http: HTTPRequest):
        await files.delete(http.state.caller.tenant, file_id)
        if anthropic(http):
            return anthropic_deleted(file_id)
        return {"id": file_id, "object": "file", "deleted": True}
