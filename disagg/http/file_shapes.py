"""A stored file (http/file_store.py) as each API shows it: OpenAI's File object and list page, or Anthropic's
file metadata and cursor page (its Files API, which its clients call at the same `/v1/files` paths; http/files.py
picks the shape by the caller's dialect, http/errors.py's `dialect_of`).  Pure."""

from __future__ import annotations

import datetime
from typing import Any

from disagg.errors import InvalidRequest
from disagg.http.file_store import StoredFile

PAGE_PREFIX = "page_"  # Anthropic's page cursors: opaque to its clients; ours hold the last listed file's place
MAX_IDS = 100  # Anthropic's most ids in one listing


def openai_file(stored: StoredFile) -> dict[str, Any]:
    """The File object, as POST /v1/files and GET /v1/files/{id} return it."""
    return {
        "id": stored.file_id,
        "object": "file",
        "bytes": stored.size,
        "created_at": stored.created_at,
        "expires_at": stored.expires_at,
        "filename": stored.filename,
        "purpose": stored.purpose.value,
        "status": "processed",
    }


def openai_page(files: list[StoredFile], *, order: str, limit: int, after: str) -> dict[str, Any]:
    """OpenAI's list of files: `order` asc / desc by creation, up to `limit`, after the file id `after`."""
    chosen, more = _slice(files[::-1] if order == "desc" else files, limit, after, "after")
    first, last = (chosen[0].file_id, chosen[-1].file_id) if chosen else (None, None)
    data = [openai_file(f) for f in chosen]
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}


def anthropic_file(stored: StoredFile) -> dict[str, Any]:
    """Anthropic's file metadata (its times RFC 3339).  `downloadable`: this server serves every file's content
    back to its owner."""
    return {
        "id": stored.file_id,
        "type": "file",
        "filename": stored.filename,
        "mime_type": stored.mime_type,
        "size_bytes": stored.size,
        "created_at": _rfc3339(stored.created_at),
        "expires_at": _rfc3339(stored.expires_at),
        "downloadable": True,
    }


def anthropic_page(files: list[StoredFile], *, limit: int, page: str, after_id: str) -> dict[str, Any]:
    """Anthropic's list of files, newest first: up to `limit` after the `page` cursor (a `next_page` this gave) or
    the file `after_id`, with the next page's cursor (None: the last); the first / last ids and `has_more` too, as
    its clients before the cursor read them.  A cursor holds a place in the store's order, not a file, so the files
    of earlier pages may be deleted while a client pages on."""
    newest = files[::-1]
    if page:
        older_than = _cursor(page)
        newest = [f for f in newest if f.seq < older_than]
    elif after_id:
        newest, _ = _slice(newest, len(newest), after_id, "after_id")
    chosen, more = newest[:limit], len(newest) > limit
    return _anthropic_list(chosen, more, f"{PAGE_PREFIX}{chosen[-1].seq}" if more else None)


def anthropic_by_ids(files: list[StoredFile], ids: list[str], *, paged: bool) -> dict[str, Any]:
    """The files of `ids` that are there (others are left out, as Anthropic's listing does), newest first, on one
    page; `ids` goes with neither a cursor nor a limit."""
    if paged:
        raise InvalidRequest("ids cannot be given with page or limit", param="ids")
    if len(set(ids)) > MAX_IDS:
        raise InvalidRequest(f"at most {MAX_IDS} ids", param="ids")
    wanted = set(ids)
    return _anthropic_list([f for f in files[::-1] if f.file_id in wanted], False, None)


def _anthropic_list(chosen: list[StoredFile], more: bool, next_page: str | None) -> dict[str, Any]:
    first, last = (chosen[0].file_id, chosen[-1].file_id) if chosen else (None, None)
    data = [anthropic_file(f) for f in chosen]
    return {"data": data, "next_page": next_page, "first_id": first, "last_id": last, "has_more": more}


def _cursor(page: str) -> int:
    seq = page.removeprefix(PAGE_PREFIX)
    if not page.startswith(PAGE_PREFIX) or not seq.isdigit():
        raise InvalidRequest(f"page: {page!r} is not a cursor this server gave", param="page")
    return int(seq)


def anthropic_deleted(file_id: str) -> dict[str, Any]:
    return {"id": file_id, "type": "file_deleted"}


def _slice(ordered: list[StoredFile], limit: int, after: str, param: str) -> tuple[list[StoredFile], bool]:
    """Up to `limit` files of `ordered` after the one `after` names (""; from the first), and whether more follow."""
    ids = [f.file_id for f in ordered]
    if after and after not in ids:
        raise InvalidRequest(f"{param}: no file {after!r}", param=param)
    start = ids.index(after) + 1 if after else 0
    chosen = ordered[start : start + limit]
    return chosen, start + len(chosen) < len(ordered)


def _rfc3339(unix_s: int) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
