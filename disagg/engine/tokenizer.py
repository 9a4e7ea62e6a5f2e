"""Tokenizer and chat template, loaded offline from the model directory (tokenizer.json + jinja template)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


# rendered in a prefill's place to find where it goes (no template writes this itself)
PREFILL_MARK = "\u2063disagg-prefill\u2063"


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any], chat_template: str | None) -> None:
        self._tok = tokenizer
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = chat_template
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        template_file = model_dir / "chat_template.jinja"
        if template is None and template_file.exists():
            template = template_file.read_text()
        return cls(HFTokenizer.from_file(str(path)), config, template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def token_text(self, token_id: int) -> str | None:
        """A token's own text (a special token's, e.g. a VLM's `<image>`); None: no such id."""
        return self._tok.id_to_token(token_id)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """Render `messages` through the model's template; `extra` are further template variables (`tools`).
        `continue_final_message`: the last message is the start of the assistant's answer (a prefill): the prompt
        ends right after its text, without the template's end of turn, so the answer continues it.  The cut is
        found with a marker rendered in the text's place (HF transformers' search for the text itself can land in
        the template's own markup when the text is short, e.g. "<")."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use a plain completion prompt")
        if continue_final_message:
            final = messages[-1].get("content") if messages else None
            if not isinstance(final, str) or not final.strip() or messages[-1].get("role") != "assistant":
                raise ValueError("continuing the final message needs a final assistant message with text")
            marked = [*messages[:-1], {**messages[-1], "content": PREFILL_MARK}]
            rendered = self.apply_chat_template(marked, add_generation_prompt=False, **extra)
            if PREFILL_MARK not in rendered:
                raise ValueError("the chat template does not render the final message's text as it is")
            return rendered[: rendered.rindex(PREFILL_MARK)] + final

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        continue_final_message: bool = False,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> list[int]:
        text = self.apply_chat_template(
            messages, add_generation_prompt and not continue_final_message, continue_final_message, **extra
        )
        return self.encode(text, add_special_tokens=False)

    def decode_incremental(self, ids: list[int], prefix_offset: int, read_offset: int) -> tuple[str, int, int]:
        """New text since `read_offset`, decoding a small window so multi-token characters come out whole.

        Returns (new_text, prefix_offset, read_offset); holds text back while it ends in an incomplete character.
        """
        prefix_text = self.decode(ids[prefix_offset:read_offset])
        full_text = self.decode(ids[prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            return full_text[len(prefix_text) :], read_offset, len(ids)
        return "", prefix_offset, read_offset
