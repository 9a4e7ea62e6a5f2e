"""LoRA adapters as the router checks them before serving any (pure: json and the safetensors header, no torch):
the PEFT files are there, the format is plain LoRA, and every tensor's shape fits the base model's config.json.
The worker checks the same again when it loads the weights (engine/lora.py); checking here first turns a bad
adapter into a 400 (or a refused deployment) naming the problem, instead of a failure on every worker it reaches.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "extra saved modules",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layers_to_transform": "a subset of layers",
}
_HEADER_LEN_BYTES = 8  # a safetensors file opens with its JSON header's length (little-endian u64)
_MAX_HEADER_BYTES = 100 << 20


class AdapterError(ValueError):
    """An adapter directory this model cannot run, with the reason."""


def adapter_config(path: Path) -> dict:
    """The adapter's PEFT config, checked: the files exist and it is plain LoRA."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).exists():
            raise AdapterError(
                f"{path}: no {name} (a PEFT LoRA adapter directory has {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as exc:
        raise AdapterError(f"{path / CONFIG_FILE}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path / CONFIG_FILE}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: a {config['peft_type']} adapter; only LoRA is served")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: adapters with trained biases are not served")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{path}: {what} ({key}) are not served")
    return config


def expected_shapes(base_config: dict) -> dict[str, tuple[int, int]]:
    """Per PEFT module of a Llama/Qwen2 decoder: (input width, output rows)."""
    h, inter = base_config["hidden_size"], base_config["intermediate_size"]
    heads = base_config["num_attention_heads"]
    head_dim = base_config.get("head_dim") or h // heads
    q, kv = heads * head_dim, base_config.get("num_key_value_heads", heads) * head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape from a safetensors file's header."""
    with path.open("rb") as f:
        raw = f.read(_HEADER_LEN_BYTES)
        if len(raw) != _HEADER_LEN_BYTES:
            raise AdapterError(f"{path}: not a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER_BYTES:
            raise AdapterError(f"{path}: not a safetensors file")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise AdapterError(f"{path}: not a safetensors file") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def check_adapter(path: str | Path, model_dir: str | Path) -> None:
    """AdapterError naming the problem unless `path` is a LoRA adapter this base model can run."""
    path = Path(path)
    adapter_config(path)
    base_config = Path(model_dir) / "config.json"
    if not base_config.exists():
        raise AdapterError(f"the base model's config.json is not in {model_dir!s:.200}")
    base = json.loads(base_config.read_text())
    shapes, layers = expected_shapes(base), base["num_hidden_layers"]
    found = 0
    for key, shape in tensor_shapes(path / WEIGHTS_FILE).items():
        parts = key.split(".")
        if parts[-2] not in ("lora_A", "lora_B") or "layers" not in parts:
            raise AdapterError(f"{path}: unexpected tensor {key!r}")
        module, layer = parts[-3], int(parts[parts.index("layers") + 1])
        if module not in shapes:
            raise AdapterError(f"{path}: adapts {module}, which is not served (only {', '.join(shapes)})")
        if not 0 <= layer < layers:
            raise AdapterError(f"{path}: layer {layer} does not exist (the model has {layers})")
        width, rows = shapes[module]
        fits = shape[1] == width if parts[-2] == "lora_A" else shape[0] == rows
        if len(shape) != 2 or not fits:
            raise AdapterError(
                f"{path}: {key} has shape {shape}, which does not fit this model's {module} ({width} in, {rows} out): "
                "an adapter of another base model?"
            )
        found += 1
    if not found:
        raise AdapterError(f"{path}: {WEIGHTS_FILE} holds no LoRA weights")
