"""LoRA adapters as the router checks them before serving any (pure: json and the safetensors header, no torch):
the PEFT files are there, the format is plain LoRA, and every tensor's shape fits the base model's config.json.
The worker checks the same again when it loads the weights (engine/lora.py, with the same `parse_key` and
`projection_shapes`); checking here first turns a bad adapter into a 400 (or a refused deployment) naming the
problem, instead of a failure on every worker it reaches.

An adapter is known by its name, its directory and a digest of its files (`check_adapter` returns it): retrained
weights in the same directory are another adapter, with their own KV and their own place in a worker's cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

from disagg.errors import InvalidRequest

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
_DIGEST_BYTES = 8
_READ_CHUNK = 1 << 20


class AdapterError(InvalidRequest):
    """An adapter directory this model cannot run, with the reason (a 400 where a request meets it)."""


def adapter_config(path: Path) -> dict:
    """The adapter's PEFT config, checked: the files exist, it is plain LoRA, its rank and alpha are usable."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise AdapterError(f"{path}: no {name} (a PEFT LoRA directory has {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path / CONFIG_FILE}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path / CONFIG_FILE}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: a {config['peft_type']} adapter; only LoRA is served")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: adapters with trained biases are not served")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{path}: {what} ({key}) are not served")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterError(f"{path}: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    return config


def projection_shapes(hidden: int, intermediate: int, q_width: int, kv_width: int) -> dict[str, tuple[int, int]]:
    """Per PEFT module of a Llama/Qwen2 decoder layer: (input width, output rows), in the fused order."""
    return {
        "q_proj": (hidden, q_width),
        "k_proj": (hidden, kv_width),
        "v_proj": (hidden, kv_width),
        "o_proj": (q_width, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def parse_key(key: str, where: str = "") -> tuple[int, str, str]:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> (3, "q_proj", "A")."""
    parts = key.split(".")
    try:
        at = parts.index("layers")
        which = {"lora_A": "A", "lora_B": "B"}[parts[-2]]
        return int(parts[at + 1]), parts[-3], which
    except (ValueError, KeyError, IndexError):
        raise AdapterError(f"{where}unexpected tensor {key!r} in {WEIGHTS_FILE}") from None


def _base_shapes(model_dir: Path) -> tuple[dict[str, tuple[int, int]], int]:
    try:
        base = json.loads((model_dir / "config.json").read_text())
        heads = base["num_attention_heads"]
        head_dim = base.get("head_dim") or base["hidden_size"] // heads
        kv_heads = base.get("num_key_value_heads", heads)
        shapes = projection_shapes(
            base["hidden_size"], base["intermediate_size"], heads * head_dim, kv_heads * head_dim
        )
        return shapes, int(base["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise AdapterError(f"the base model's config.json in {model_dir!s:.200} is unusable ({exc!r})") from None


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape from a safetensors file's header."""
    try:
        with path.open("rb") as f:
            raw = f.read(_HEADER_LEN_BYTES)
            (size,) = struct.unpack("<Q", raw) if len(raw) == _HEADER_LEN_BYTES else (0,)
            header = json.loads(f.read(size)) if 0 < size <= _MAX_HEADER_BYTES else None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: unreadable ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: not a safetensors file")
    shapes = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
            raise AdapterError(f"{path}: {key!r} has no tensor shape: not a safetensors file")
        shapes[key] = shape
    return shapes


def adapter_digest(path: Path) -> str:
    """A digest of the adapter's two files (what makes retrained weights another adapter)."""
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            with (path / name).open("rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise AdapterError(f"{path / name}: unreadable ({exc})") from None
    return digest.hexdigest()


def check_adapter(path: str | Path, model_dir: str | Path) -> str:
    """The adapter's digest if `path` is a LoRA adapter this base model can run; AdapterError naming the problem
    otherwise."""
    path = Path(path)
    adapter_config(path)
    shapes, layers = _base_shapes(Path(model_dir))
    found = 0
    for key, shape in tensor_shapes(path / WEIGHTS_FILE).items():
        layer, module, which = parse_key(key, f"{path}: ")
        if module not in shapes:
            raise AdapterError(f"{path}: adapts {module}, which is not served (only {', '.join(shapes)})")
        if not 0 <= layer < layers:
            raise AdapterError(f"{path}: layer {layer} does not exist (the model has {layers})")
        width, rows = shapes[module]
        if len(shape) != 2 or (shape[1] != width if which == "A" else shape[0] != rows):
            raise AdapterError(
                f"{path}: {key} has shape {shape}, which does not fit this model's {module} ({width} in, {rows} out): "
                "an adapter of another base model?"
            )
        found += 1
    if not found:
        raise AdapterError(f"{path}: {WEIGHTS_FILE} holds no LoRA weights")
    return adapter_digest(path)
