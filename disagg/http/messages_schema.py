"""Anthropic's Messages API request body (`POST /v1/messages`), and how it becomes a chat conversation.

`system` becomes the system message; a user turn's `tool_result` blocks become `tool` turns (in order, before the
turn's text); an assistant turn's `tool_use` blocks become its `tool_calls` (their `input` object as JSON
arguments).  Tools (`input_schema`) become chat function tools.  So a Messages request and the equivalent chat
completion render the same prompt and give the same tokens.  Prompt caching's `cache_control` marks
({"type": "ephemeral", "ttl": "5m" | "1h"}) on any block or tool ask that the conversation's KV be kept: they
become KV retention for the longest TTL asked (http/hints.py's reading of TTLs).  Image blocks in user turns (base64
or URL sources) become the image's place in the text, as chat's `image_url` parts do (a LLaVA model: http/images.py).
Document blocks, and `tool_choice` "any" / "tool" (guided decoding), are refused with a 400 naming them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from disagg.http.hints import RETENTION_DEFAULT_S, ttl_seconds
from disagg.http.schemas import Extensions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CacheControl(_Strict):
    type: Literal["ephemeral"]
    ttl: str | None = None


class _Cacheable(_Strict):
    cache_control: CacheControl | None = None


class TextBlock(_Cacheable):
    type: Literal["text"]
    text: str
    citations: list[Any] | None = None  # echoed back by clients; not produced here


class ToolUseBlock(_Cacheable):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Cacheable):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class URLSource(_Strict):
    type: Literal["url"]
    url: str


class FileSource(_Strict):
    """An uploaded file (the Files API, http/files.py), read into a base64 source before the request is served
    (http/file_images.py)."""

    type: Literal["file"]
    file_id: str = Field(min_length=1)


class ImageBlock(_Cacheable):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource | FileSource, Field(discriminator="type")]

    def url(self) -> str:
        """As chat's image_url would carry it: a data URL for base64 data."""
        source = self.source
        if isinstance(source, FileSource):  # http/file_images.py reads it first: not read is a bug, not bad input
            raise RuntimeError(f"image file {source.file_id} was not read before its image was loaded")
        return source.url if isinstance(source, URLSource) else f"data:{source.media_type};base64,{source.data}"


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ImageBlock, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _check(self) -> Message:
        misplaced = ("tool_result", "image") if self.role == "assistant" else ("tool_use",)
        for block in self.content if isinstance(self.content, list) else ():
            if block.type in misplaced:
                raise ValueError(f"{block.type} blocks cannot be in {self.role} turns")
        return self

    def blocks(self) -> list[Block]:
        """Its content blocks (none when its content is a string)."""
        return self.content if isinstance(self.content, list) else []

    def image_blocks(self) -> list[ImageBlock]:
        return [b for b in self.blocks() if isinstance(b, ImageBlock)]

    def image_urls(self) -> list[str]:
        return [b.url() for b in self.image_blocks()]


class Tool(_Cacheable):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    def for_chat(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class ToolChoice(_Strict):
    type: Literal["auto", "none"]
    disable_parallel_tool_use: bool = False


class Thinking(_Strict):
    type: Literal["disabled"]  # extended thinking is not done here: only "disabled" is accepted


class Metadata(_Strict):
    user_id: str | None = None


class MessagesRequest(_Cacheable, Extensions):  # Extensions: ours, as on every endpoint (http/schemas.py)
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    # sampling: current clients no longer send these (the API samples at 1.0); older ones do, and extra_body can
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    stream: bool = False
    metadata: Metadata | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    # (cache_control, from _Cacheable: automatic prompt caching of the whole conversation)
    service_tier: Literal["auto", "standard_only"] | None = None
    thinking: Thinking | None = None

    @model_validator(mode="before")
    @classmethod
    def _name_unsupported(cls, data: Any) -> Any:
        """A clear 400 for what the Messages API has and this server does not do."""
        if not isinstance(data, dict):
            return data
        choice = data.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
            raise ValueError(f"tool_choice {choice['type']!r} needs guided decoding, which this server does not do")
        messages = data.get("messages")
        for message in messages if isinstance(messages, list) else ():  # other types: the field's own 400
            content = message.get("content") if isinstance(message, dict) else None
            for block in content if isinstance(content, list) else ():
                kind = block.get("type") if isinstance(block, dict) else None
                if kind in ("document", "thinking", "redacted_thinking"):
                    raise ValueError(f"content blocks of type {kind!r} are not supported by this server")
        return data

    def stop_list(self) -> list[str]:
        return list(self.stop_sequences or ())

    def offered_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools or (self.tool_choice is not None and self.tool_choice.type == "none"):
            return None
        return [t.for_chat() for t in self.tools]

    def parallel_tool_calls(self) -> bool:
        return self.tool_choice is None or not self.tool_choice.disable_parallel_tool_use

    def retention_s(self) -> float | None:
        """The longest TTL the blocks' `cache_control` marks ask for (None: none asked)."""
        marks = [b.cache_control for b in self._cacheables() if b.cache_control is not None]
        if not marks:
            return None
        return max(ttl_seconds(m.ttl) or RETENTION_DEFAULT_S for m in marks)

    def _cacheables(self) -> list[_Cacheable]:
        out: list[_Cacheable] = [self] if self.cache_control is not None else []
        out += self.tools or []
        out += self.system if isinstance(self.system, list) else []
        for m in self.messages:
            out += m.content if isinstance(m.content, list) else []
        return out

    def image_urls(self) -> list[str]:
        return [url for m in self.messages for url in m.image_urls()]

    def conversation(self, image_token: str = "") -> list[dict[str, Any]]:
        """The chat messages (the template's form) this request holds; an image block is `image_token`."""
        out: list[dict[str, Any]] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            out.append({"role": "system", "content": system})
        for m in self.messages:
            out += _turn(m, image_token)
        return out


def _turn(m: Message, image_token: str) -> list[dict[str, Any]]:
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    text = "".join(
        b.text if isinstance(b, TextBlock) else image_token for b in m.content if isinstance(b, TextBlock | ImageBlock)
    )
    if m.role == "assistant":
        calls = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
            for b in m.content
            if isinstance(b, ToolUseBlock)
        ]
        return [{"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}]
    results = [
        {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
        for b in m.content
        if isinstance(b, ToolResultBlock)
    ]
    return results + ([{"role": "user", "content": text}] if text or not results else [])


class CountTokensRequest(MessagesRequest):
    """`POST /v1/messages/count_tokens`: a Messages request without `max_tokens`; it may end with an assistant
    turn (counting runs nothing)."""

    max_tokens: int = Field(default=1, ge=1)
