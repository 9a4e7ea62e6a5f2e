"""OpenAI request bodies (pydantic). Unknown fields are rejected; supported-but-ignored fields must be default."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from disagg.http.hints import RETENTION_MAX_S
from disagg.protocol import MAX_LOGPROBS


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class KVRetention(BaseModel):
    """Keep this request's KV (prompt + output) pinned in the serving worker's CPU tier for `ttl_s` seconds, so
    the next turn of the same session (`user` or the X-Session-ID header) finds it without recompute."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ttl_s: float = Field(gt=0, le=3600)


class Extensions(BaseModel):
    """Our fields beyond each API's own, the same on every generation endpoint (chat, completions, responses,
    messages)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    seed: int | None = None
    ignore_eos: bool = False
    priority: int | None = Field(default=None, ge=-100, le=100)  # higher = more important (X-Priority header too)
    deadline_s: float | None = Field(default=None, gt=0)  # must start within this, else 429 (server default)
    # vLLM's extension: requests with the same salt share prefix-cache hits across tenants (disagg/isolation.py)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    # agent hints, read leniently (http/hints.py): whatever JSON they hold, never a 400
    nvext: Any = None
    kv_hints: Any = None


class PromptCache(BaseModel):
    """OpenAI's prompt-cache fields: `prompt_cache_key` groups requests that share a prefix (here: the session the
    router keeps together on one worker), `prompt_cache_retention` "24h" asks to keep the prefix longer (here: KV
    retention for the longest TTL we allow)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt_cache_key: str | None = Field(default=None, min_length=1, max_length=256)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = Field(default=None, max_length=256)  # accepted: nothing here uses it
    service_tier: Literal["auto", "default"] | None = None  # one tier here

    def cache_retention_s(self) -> float | None:
        return RETENTION_MAX_S if self.prompt_cache_retention == "24h" else None


class _Sampling(Extensions, PromptCache):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    frequency_penalty: Literal[0] = 0  # 0 and 0.0 both validate (1 == 1.0 for Literal); others are a 400
    presence_penalty: Literal[0] = 0
    kv_retention: KVRetention | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(min_length=1)
    echo: Literal[False] = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # top alternatives per token


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str  # a data URL; http(s) only where the server fetches (disagg/vision/images.py)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model sees every image at its one size


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


class FileRef(BaseModel):
    """An uploaded file's id (the Files API) or the file itself (a data URL, or bare base64), as OpenAI's `file`
    parts carry them; `filename` is accepted.  Images only here: http/file_images.py makes the part an image part
    before the request is served."""

    model_config = ConfigDict(extra="forbid", strict=True)
    file_id: str | None = Field(default=None, min_length=1)
    file_data: str | None = Field(default=None, min_length=1)
    filename: str | None = None

    @model_validator(mode="after")
    def _one(self) -> FileRef:
        if (self.file_id is None) == (self.file_data is None):
            raise ValueError("a file part names exactly one of file_id and file_data")
        return self


class FilePart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["file"]
    file: FileRef


ContentPart = Annotated[TextPart | ImagePart | FilePart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str  # JSON text


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: which call this answers
    refusal: str | None = None  # assistant turns echoed back by clients

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError("content may be null only in an assistant message with tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self, image_token: str = "") -> str:
        """The content as one text, each image part as `image_token` (the model's image token) in its place."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, TextPart) else image_token for p in self.content)

    def parts(self) -> list[ContentPart]:
        """Its content parts (none when its content is a string or null)."""
        return self.content if isinstance(self.content, list) else []

    def image_urls(self) -> list[str]:
        if any(isinstance(p, FilePart) for p in self.parts()):  # http/file_images.py reads them first
            raise RuntimeError("a file part was not read before the message's images were loaded")
        return [p.image_url.url for p in self.parts() if isinstance(p, ImagePart)]

    def for_template(self, image_token: str = "") -> dict[str, Any]:
        text = self.text(image_token) if self.content is not None else None
        out: dict[str, Any] = {"role": self.role, "content": text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDef


class _FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: _FunctionName


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None  # accepted and ignored (OpenAI keeps it with stored completions)
    store: bool | None = None  # accepted; this server stores no completions
    # vLLM's: the last message, an assistant's, is the start of the answer (a prefill), which the answer continues;
    # needs add_generation_prompt false, as vLLM has it
    continue_final_message: bool = False
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt false")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError(
                "tool_choice 'required' or a named function needs constrained (guided) decoding, "
                "which this server does not do; use 'auto' or 'none'"
            )
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(
                f"response_format {self.response_format.type!r} needs constrained (guided) decoding, "
                "which this server does not do; only {'type': 'text'} is supported"
            )
        return self

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model is shown (none when tool_choice is 'none')."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class RoleChangeBody(BaseModel):
    """POST /admin/workers/{name}/role: move a worker to another role at runtime (router/roles.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["prefill", "decode", "both"]
    reason: str = "manual"
