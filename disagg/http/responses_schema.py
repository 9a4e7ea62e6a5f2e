"""The OpenAI Responses API's request body (`POST /v1/responses`), and how it becomes a chat conversation.

Input is a string (one user message) or a list of items: messages (`input_text` / `output_text` parts, the
assistant's earlier output echoed back as it was returned, `input_image` parts for a LLaVA model: their images'
place in the text, as chat's `image_url` parts), `function_call` items and `function_call_output` items.  They
become the chat messages the template renders - `instructions` as the system message, function calls as an
assistant turn's `tool_calls`, their outputs as `tool` turns - so a Responses request and the equivalent
chat completion give the same prompt tokens, hence the same answer.  Function tools are flat here
(`{"type": "function", "name": ...}`) and nested in chat; tools of other kinds (web search, file search, ...) are
hosted tools this server does not run: 400.  Unknown item types and unknown fields are 400s (pydantic), a
`function_call_output` whose `call_id` no earlier `function_call` made is a 400 (http/inputs.py's
`check_tool_results`).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from disagg.http.schemas import Extensions, KVRetention, PromptCache


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Echoed(BaseModel):
    """Items and parts as clients send back what we returned: our extra fields (ids, status, annotations) are
    accepted and not used."""

    model_config = ConfigDict(extra="ignore", strict=True)


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Echoed):
    type: Literal["output_text"]
    text: str


class InputImage(_Strict):
    """An image by URL (a data URL, or http(s) where the server fetches) or by `file_id` (an upload: /v1/files);
    http/files.py's `inline_files` turns a `file_id` into the upload's data URL before the image is loaded."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InputImage:
        if (self.image_url is None) == (self.file_id is None):
            raise ValueError("an input_image takes exactly one of image_url and file_id")
        return self

    def listed(self) -> dict[str, Any]:
        return {"type": "input_image", "image_url": self.image_url, "file_id": self.file_id, "detail": "auto"}


Part = Annotated[InputText | OutputText | InputImage, Field(discriminator="type")]


class MessageItem(_Echoed):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]

    def listed(self) -> dict[str, Any]:
        """As GET /v1/responses/{id}/input_items lists it."""
        kind = "output_text" if self.role == "assistant" else "input_text"
        part: dict[str, Any] = {"type": kind, "text": self.text()}
        if kind == "output_text":
            part["annotations"] = []
        images = [p.listed() for p in self.parts() if isinstance(p, InputImage)]
        item_id = self.id or f"msg_{uuid.uuid4().hex}"
        content = [part, *images]
        return {"type": "message", "id": item_id, "role": self.role, "status": "completed", "content": content}

    def text(self, image_token: str = "") -> str:
        """The content as one text, each image part as `image_token` in its place."""
        if isinstance(self.content, str):
            return self.content
        return "".join(image_token if isinstance(p, InputImage) else p.text for p in self.content)

    def parts(self) -> list[Part]:
        return self.content if isinstance(self.content, list) else []

    def image_urls(self) -> list[str]:
        """The images' URLs (after `inline_files`: a `file_id` part's is its upload's data URL)."""
        return [p.image_url or "" for p in self.parts() if isinstance(p, InputImage)]


class FunctionCallItem(_Echoed):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str
    arguments: str  # JSON text

    def listed(self) -> dict[str, Any]:
        item_id = self.id or f"fc_{uuid.uuid4().hex}"
        return {**self.model_dump(), "id": item_id, "status": "completed"}


class FunctionCallOutputItem(_Echoed):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str

    def listed(self) -> dict[str, Any]:
        item_id = self.id or f"fco_{uuid.uuid4().hex}"
        return {**self.model_dump(), "id": item_id, "status": "completed"}


Item = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")]


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def for_chat(self) -> dict[str, Any]:
        function = self.model_dump(exclude={"type"}, exclude_none=True)
        return {"type": "function", "function": function}


class TextFormat(_Strict):
    type: Literal["text"]


class TextOptions(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(Extensions, PromptCache):
    model: str
    input: str | list[Item]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    truncation: Literal["disabled"] | None = None
    background: Literal[False] | None = None
    include: list[str] | None = None  # what to add to the output: nothing this server can add (a 400 names it)
    # more of our extensions (the chat endpoint's too)
    top_k: int = Field(default=-1, ge=-1)
    kv_retention: KVRetention | None = None

    @model_validator(mode="before")
    @classmethod
    def _name_unsupported(cls, data: Any) -> Any:
        """A clear 400 for what OpenAI's Responses API has and this server does not do."""
        if isinstance(data, dict):
            if isinstance(data.get("input"), list):  # an easy input message may leave out its type
                data = {**data, "input": [_typed(item) for item in data["input"]]}
            tools = data.get("tools")
            for tool in tools if isinstance(tools, list) else ():  # other types: the field's own 400
                if isinstance(tool, dict) and tool.get("type") != "function":
                    raise ValueError(f"tool type {tool.get('type')!r} is a hosted tool this server does not run")
            if data.get("include"):
                raise ValueError(f"include {data['include']!r}: this server adds nothing to a response's output")
            choice = data.get("tool_choice")
            if choice is not None and choice not in ("none", "auto"):
                raise ValueError("tool_choice other than 'auto' or 'none' needs guided decoding, not done here")
        return data

    def stop_list(self) -> list[str]:
        return []  # the Responses API has no stop sequences

    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)

    def offered_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.for_chat() for t in self.tools]


def _typed(item: Any) -> Any:
    if isinstance(item, dict) and "type" not in item and "role" in item:
        return {**item, "type": "message"}
    return item


def items_to_messages(
    items: list[MessageItem | FunctionCallItem | FunctionCallOutputItem], image_token: str = ""
) -> list[dict[str, Any]]:
    """Chat messages (the template's form) for Responses input items; consecutive function calls are one
    assistant turn's `tool_calls` (joined to the assistant message just before them, if any).  A message with
    images holds `image_token` in each one's place and their URLs under `images` (the template ignores the key;
    a stored conversation keeps them, so a follow-up sees the same images)."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            urls = item.image_urls()
            out.append({"role": item.role, "content": item.text(image_token), **({"images": urls} if urls else {})})
        elif isinstance(item, FunctionCallItem):
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last["content"] or None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out
