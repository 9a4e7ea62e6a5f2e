"""OpenAI request bodies (pydantic). Unknown fields are rejected; supported-but-ignored fields must be default."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class KVRetention(BaseModel):
    """Keep this request's KV (prompt + output) pinned in the serving worker's CPU tier for `ttl_s` seconds, so
    the next turn of the same session (`user` or the X-Session-ID header) finds it without recompute."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ttl_s: float = Field(gt=0, le=3600)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    ignore_eos: bool = False
    frequency_penalty: Literal[0, 0.0] = 0.0
    presence_penalty: Literal[0, 0.0] = 0.0
    kv_retention: KVRetention | None = None
    priority: int | None = Field(default=None, ge=-100, le=100)  # higher = more important (X-Priority header too)
    deadline_s: float | None = Field(default=None, gt=0)  # must start within this, else 429 (server default)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(min_length=1)
    echo: Literal[False] = False
    logprobs: None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] = False
