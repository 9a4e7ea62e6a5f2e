"""Images named by an uploaded file's id (http/files.py) made the request's own before it is served: a Responses
`input_image` part's `file_id` (`inline_files`), a Messages image block's `{"type": "file", "file_id"}` source
(`inline_message_files`) and a chat `file` part's `file_id` or `file_data` (`inline_chat_files`: OpenAI's file parts
carry PDFs; here, where the models read images, they carry images).  The upload becomes the part's data URL (a base64
source), so the same image sent by file and inline gives the same prompt, hence the same tokens, and a stored
conversation keeps its own copy (a follow-up still sees the image after the file is deleted).

Before any file is read: the model takes images, and the request's images are within the count limit; a file over the
image byte limit is refused from its size (413).  A file named twice is read once.  A file that is not the caller's
tenant's is a 404 naming the part that named it; one that is not an image a 400."""

from __future__ import annotations

import base64
import binascii
from typing import Any, TypeVar

from disagg.errors import InvalidRequest
from disagg.http.file_store import FileStorePort, image_mime
from disagg.http.images import check_image_count
from disagg.http.messages_schema import Base64Source, FileSource, ImageBlock, MessagesRequest
from disagg.http.models import ServedModel
from disagg.http.responses_schema import FunctionCallItem, FunctionCallOutputItem, InputImage, MessageItem
from disagg.http.schemas import ChatCompletionRequest, FilePart, FileRef, ImagePart
from disagg.vision.images import ImageLimits, decode_data_url, too_large

Item = MessageItem | FunctionCallItem | FunctionCallOutputItem
Body = TypeVar("Body", bound=MessagesRequest)  # a Messages request, or a count_tokens one


class FileImages:
    """One request's reads of its files' images: each file at most once, its size checked before its bytes move."""

    def __init__(self, files: FileStorePort, tenant: str, limits: ImageLimits) -> None:
        self.files, self.tenant, self.limits = files, tenant, limits
        self.read: dict[str, tuple[str, bytes]] = {}  # file id -> (image type, bytes)

    async def image(self, file_id: str, param: str) -> tuple[str, bytes]:
        if file_id not in self.read:
            if (await self.files.info(self.tenant, file_id, param)).size > self.limits.max_image_bytes:
                raise too_large(self.limits, param)
            data = (await self.files.get(self.tenant, file_id, param)).data
            mime = image_mime(data)
            if mime is None:
                raise InvalidRequest(
                    "the file is not an image (PNG, JPEG, GIF or WebP)", param=param, code="invalid_image"
                )
            self.read[file_id] = mime, data
        return self.read[file_id]

    async def data_url(self, file_id: str, param: str) -> str:
        return _data_url(*await self.image(file_id, param))


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


async def inline_files(
    items: list[Item], files: FileStorePort, tenant: str, served: ServedModel, limits: ImageLimits, *, earlier: int = 0
) -> list[Item]:
    """`items` with every `input_image` that names a `file_id` given that upload's data URL (the `file_id` kept,
    so the input items list it as sent); the count includes the `earlier` images of the stored conversation it
    continues."""
    images = [p for item in items if isinstance(item, MessageItem) for p in item.parts() if isinstance(p, InputImage)]
    check_image_count(earlier + len(images), served, limits, "input")
    reads = FileImages(files, tenant, limits)
    out: list[Item] = []
    for i, item in enumerate(items):
        if not isinstance(item, MessageItem) or isinstance(item.content, str):
            out.append(item)
            continue
        parts: list[Any] = []
        for j, part in enumerate(item.content):
            if isinstance(part, InputImage) and part.file_id is not None:
                url = await reads.data_url(part.file_id, f"input[{i}].content[{j}].file_id")
                part = part.model_copy(update={"image_url": url})
            parts.append(part)
        out.append(item.model_copy(update={"content": parts}))
    return out


async def inline_message_files(
    body: Body, files: FileStorePort, tenant: str, served: ServedModel, limits: ImageLimits
) -> Body:
    """`body` with every image block whose source names a file given that upload's bytes as a base64 source."""
    if not any(isinstance(b.source, FileSource) for m in body.messages for b in m.image_blocks()):
        return body
    check_image_count(sum(len(m.image_blocks()) for m in body.messages), served, limits, "messages")
    reads = FileImages(files, tenant, limits)
    messages = []
    for i, message in enumerate(body.messages):
        blocks: list[Any] = []
        for j, block in enumerate(message.blocks()):
            if isinstance(block, ImageBlock) and isinstance(block.source, FileSource):
                mime, data = await reads.image(block.source.file_id, f"messages[{i}].content[{j}].source.file_id")
                source = Base64Source.model_validate(
                    {"type": "base64", "media_type": mime, "data": base64.b64encode(data).decode()}
                )
                block = block.model_copy(update={"source": source})
            blocks.append(block)
        messages.append(message.model_copy(update={"content": blocks}) if blocks else message)
    return body.model_copy(update={"messages": messages})


async def inline_chat_files(
    body: ChatCompletionRequest, files: FileStorePort, tenant: str, served: ServedModel, limits: ImageLimits
) -> ChatCompletionRequest:
    """`body` with every `file` part an `image_url` part: an upload's data URL, or the file's own data."""
    if not any(isinstance(p, FilePart) for m in body.messages for p in m.parts()):
        return body
    if served.vision is None:  # clients send documents this way too: say what a file part is for here
        raise InvalidRequest(
            f"file parts carry images here (no PDF or other documents), and model {served.name!r} takes none",
            param="messages",
            code="images_not_supported",
        )
    images = [p for m in body.messages for p in m.parts() if isinstance(p, ImagePart | FilePart)]
    check_image_count(len(images), served, limits, "messages")
    reads = FileImages(files, tenant, limits)
    messages = []
    for i, message in enumerate(body.messages):
        parts: list[Any] = []
        for j, part in enumerate(message.parts()):
            if isinstance(part, FilePart):
                url = await _chat_file_url(part.file, reads, limits, f"messages[{i}].content[{j}].file")
                part = ImagePart.model_validate({"type": "image_url", "image_url": {"url": url}})
            parts.append(part)
        messages.append(message.model_copy(update={"content": parts}) if parts else message)
    return body.model_copy(update={"messages": messages})


async def _chat_file_url(file: FileRef, reads: FileImages, limits: ImageLimits, param: str) -> str:
    if file.file_id is not None:
        return await reads.data_url(file.file_id, f"{param}.file_id")
    data, param = file.file_data or "", f"{param}.file_data"
    if data.startswith("data:"):  # a data URL: checked and decoded where every image's is
        raw = decode_data_url(data, limits, param)
    else:
        if len(data) * 3 // 4 > limits.max_image_bytes:  # before decoding, as a data URL's
            raise too_large(limits, param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("file_data is neither a data URL nor base64", param=param) from None
    mime = image_mime(raw)
    if mime is None:
        raise InvalidRequest(
            "a file part here carries an image (PNG, JPEG, GIF or WebP)", param=param, code="invalid_image"
        )
    return _data_url(mime, raw)
