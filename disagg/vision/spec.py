"""What serving a vision-language model needs to know of it, read from its HF `config.json` alone (no torch): the
image token, how many prompt positions one image takes, and where the language model's config is.

Supported: LLaVA (`model_type: llava`, HF's LlavaForConditionalGeneration): a vision tower (CLIP or SigLIP) whose
chosen layer's patch features go through a two-layer projector into the language model's embedding space, one
embedding row per image position.  The language model is a Llama/Qwen2/Mistral decoder our engine runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VLM_MODEL_TYPES = {"llava"}


@dataclass(frozen=True)
class VisionSpec:
    image_token_id: int  # the tokenizer's image token, expanded to tokens_per_image positions
    tokens_per_image: int
    hidden_size: int  # of the language model: one embedding row per image position
    vocab_size: int  # of the language model: placeholder ids start here

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> VisionSpec | None:
        """None for a text-only model; ValueError for a VLM configuration this runtime cannot serve."""
        if cfg.get("model_type") not in VLM_MODEL_TYPES:
            return None
        vision = {**_CLIP_DEFAULTS, **cfg.get("vision_config", {})}
        strategy = cfg.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported")
        patches = (vision["image_size"] // vision["patch_size"]) ** 2
        # the tower's rows: its patches, and a class token first for CLIP (SigLIP has none); "default" drops the
        # first row whatever it is, as HF's LlavaModel does
        has_cls = vision["model_type"] == "clip_vision_model"
        tokens = patches + int(has_cls) - int(strategy == "default")
        text = text_config(cfg)
        return cls(
            image_token_id=int(cfg.get("image_token_index", cfg.get("image_token_id", -1))),
            tokens_per_image=tokens,
            hidden_size=text["hidden_size"],
            vocab_size=text["vocab_size"],
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> VisionSpec | None:
        path = Path(model_dir) / "config.json"
        return cls.from_config(json.loads(path.read_text())) if path.exists() else None


# what HF's config classes assume for fields a saved config leaves out (llava-hf's llava-1.5 checkpoints write only
# what differs from these): LlamaConfig's and CLIPVisionConfig's defaults
_LLAMA_DEFAULTS: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}
_CLIP_DEFAULTS: dict[str, Any] = {"model_type": "clip_vision_model", "image_size": 224, "patch_size": 32}


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config: a VLM's `text_config` (with the VLM's token ids, and HF's defaults
    for a Llama's fields it leaves out), else the config."""
    if cfg.get("model_type") not in VLM_MODEL_TYPES:
        return cfg
    given = cfg.get("text_config", {})
    text = {**(_LLAMA_DEFAULTS if given.get("model_type", "llama") == "llama" else {}), **given}
    for key in ("eos_token_id", "bos_token_id", "tie_word_embeddings"):
        if key in cfg and key not in text:
            text[key] = cfg[key]
    return text
