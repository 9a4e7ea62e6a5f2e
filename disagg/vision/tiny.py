"""A fixed-seed LLaVA checkpoint (HF's LlavaForConditionalGeneration: a CLIP vision tower, the two-layer projector,
a Llama language model) for tests and the lab: no VLM weights are reachable offline, so the architecture is real
and the weights random.  `tokenizer_from` gives it a real tokenizer and chat template plus an `<image>` token, so it
serves over HTTP; the vision tower's size is a parameter, so the lab can time a realistically sized encoder."""

from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = "<image>"


def make_tiny_vlm(
    path: str | Path,
    tokenizer_from: Path,
    seed: int = 0,
    *,
    image_size: int = 56,
    patch_size: int = 14,
    vision: dict[str, int] | None = None,
    text: dict[str, int] | None = None,
) -> Path:
    """Writes (once) and returns the checkpoint directory; deterministic for a seed and shape.  `vision` / `text`:
    CLIPVisionConfig / LlamaConfig fields over the tiny defaults (the lab's realistic sizes)."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    path = Path(path)
    if (path / "config.json").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_shape = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    vision_shape.update(vision or {})
    text_shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    text_shape.update(text or {})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch_size, **vision_shape),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **text_shape,
        ),
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float()
    with torch.no_grad():  # a wider spread than HF's init, so logits are far from ties
        for name, p in model.named_parameters():
            if p.dim() > 1 and "vision_tower" not in name:
                p.normal_(0, 0.15)
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    size = {"shortest_edge": image_size}
    CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(str(tmp))
    tmp.rename(path)
    return path
