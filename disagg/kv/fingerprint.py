"""Engine fingerprint: what must match for stored KV to be valid in this engine.

KV written by one engine is only meaningful to an engine with the same weights, dtype, block size and cache
layout.  The fingerprint hashes: the model's config.json, each weights file's name, size and its first and last
MiB (cheap, and changes with any re-quantization or fine-tune that rewrites the file), the dtype, the block size,
the per-block KV shape, the weights' quantization (--quantization), the KV cache's element format (--kv-dtype:
int8 and fp8 blocks have the same shape and bytes but mean different numbers), and KV_LAYOUT_VERSION (bumped
whenever the block layout changes).  Disk blocks live under a directory named by it and carry it in every file header.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

KV_LAYOUT_VERSION = 1  # [blocks, layers, 2, block_size, kv_heads, head_dim], block-major
_EDGE_BYTES = 1 << 20


def engine_fingerprint(
    model_dir: str | Path | None,
    dtype: str,
    block_size: int,
    block_shape: tuple[int, ...],
    model_identity: str = "",
    quantization: str = "none",
    kv_format: str = "",
    activations: str = "float32",
) -> str:
    """16 hex characters. `model_dir` None: a stand-in model (simulation), identified by `model_identity`.
    `quantization` (--quantization) and `activations` (--quant-activations) are part of it: KV computed with
    other weights, or with activations rounded otherwise, is other KV."""
    h = hashlib.blake2b(digest_size=8)
    quant = "" if quantization == "none" else f";quant={quantization}"  # "none" keeps existing disk tiers valid
    kv = "" if kv_format in ("", dtype.removeprefix("torch.")) else f";kv={kv_format}"  # likewise
    quant += "" if activations == "float32" else f";act={activations}"
    h.update(
        f"layout={KV_LAYOUT_VERSION};dtype={dtype};block={block_size};shape={tuple(block_shape)};"
        f"id={model_identity}{quant}{kv}".encode()
    )
    if model_dir is not None:
        root = Path(model_dir)
        config = root / "config.json"
        if config.exists():
            h.update(config.read_bytes())
        for path in sorted(root.glob("*.safetensors")):
            size = path.stat().st_size
            h.update(f"{path.name}:{size}".encode())
            with path.open("rb") as f:
                h.update(f.read(_EDGE_BYTES))
                if size > _EDGE_BYTES:
                    f.seek(max(_EDGE_BYTES, size - _EDGE_BYTES))
                    h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()
