"""The vision encoder of a LLaVA checkpoint: image bytes -> embedding rows in the language model's space.

HF's own modules run the vision tower (transformers' CLIP/SigLIP vision models, built from the checkpoint's
`vision_config`) and its image processor prepares the pixels, so the features are the ones HF computes; the
projector (linear, activation, linear) is two matmuls.  One encoder serves both places an image can be encoded: an
encoder worker (the E of E/PD: disagg/cluster/encoder.py) and a prefill or decode worker encoding its own requests'
images (colocated).  Results are cached by the image's content hash in a byte-bounded LRU, so a repeated image is
encoded once per process.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from disagg.protocol import ImageInput
from disagg.vision.images import open_image
from disagg.vision.spec import VisionSpec

_TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def _strip(name: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


class EmbeddingCache:
    """Embedding rows by image content hash, least recently used out first, at most `max_bytes` held.  Locked: a
    prefill worker that encodes for the others (cluster/actors.py) uses it from two threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            rows = self._rows.get(key)
            if rows is None:
                self.misses += 1
                return None
            self.hits += 1
            self._rows.move_to_end(key)
            return rows

    def put(self, key: str, rows: torch.Tensor) -> None:
        size = rows.numel() * rows.element_size()
        with self._lock:
            if size > self.max_bytes or key in self._rows:
                return
            self._rows[key] = rows
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._rows.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()


class VisionEncoder:
    def __init__(self, model_dir: str | Path, cache_bytes: int = 256 * 2**20) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel
        from transformers.activations import ACT2FN

        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        spec = VisionSpec.from_config(cfg)
        if spec is None:
            raise ValueError(f"{model_dir} is not a vision-language model (config.json model_type)")
        self.spec = spec
        vision_cfg = AutoConfig.for_model(**cfg["vision_config"])
        self.tower = AutoModel.from_config(vision_cfg).float().eval()
        layer = cfg.get("vision_feature_layer", -2)
        self.layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        self.drop_cls = cfg.get("vision_feature_select_strategy", "default") == "default"
        width = vision_cfg.hidden_size * len(self.layers)
        hidden = spec.hidden_size
        bias = cfg.get("multimodal_projector_bias", True)
        self.projector = nn.Sequential(
            nn.Linear(width, hidden, bias=bias), ACT2FN[cfg.get("projector_hidden_act", "gelu")],
            nn.Linear(hidden, hidden, bias=bias),
        ).eval()  # fmt: skip
        self._load(model_dir)
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir), use_fast=False)  # what HF loads it as
        self.cache = EmbeddingCache(cache_bytes)

    def _load(self, model_dir: Path) -> None:
        tower, names = self.tower.state_dict(), {"0": "linear_1", "2": "linear_2"}  # HF's projector's names
        proj_params = {f"{names[k[0]]}.{k.split('.')[1]}": v for k, v in self.projector.state_dict().items()}
        seen: set[str] = set()
        with torch.no_grad():
            for file in sorted(model_dir.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        if (t := _strip(name, _TOWER_PREFIXES)) is not None and t in tower:
                            tower[t].copy_(f.get_tensor(name))
                            seen.add(f"tower.{t}")
                        elif (p := _strip(name, _PROJECTOR_PREFIXES)) is not None and p in proj_params:
                            proj_params[p].copy_(f.get_tensor(name))
                            seen.add(f"projector.{p}")
        missing = [f"tower.{k}" for k in tower if f"tower.{k}" not in seen and "position_ids" not in k]
        missing += [f"projector.{k}" for k in proj_params if f"projector.{k}" not in seen]
        if missing:
            raise ValueError(f"vision weights missing from {model_dir}: {missing[:5]}")

    def pixels(self, images: list[bytes]) -> torch.Tensor:
        opened = [open_image(data).convert("RGB") for data in images]
        return self.processor(images=opened, return_tensors="pt")["pixel_values"].float()

    @torch.inference_mode()
    def encode_uncached(self, images: list[bytes]) -> list[torch.Tensor]:
        """[tokens_per_image, hidden] per image, as HF's LlavaModel.get_image_features computes them."""
        out = self.tower(self.pixels(images), output_hidden_states=True)
        features = torch.cat([out.hidden_states[i] for i in self.layers], dim=-1)
        if self.drop_cls:
            features = features[:, 1:]
        rows = self.projector(features)
        return [r.contiguous() for r in rows]

    def encode(self, images: list[tuple[str, bytes]]) -> list[torch.Tensor]:
        """Rows per (content hash, bytes), from the cache where it has them; the rest encoded in one batch."""
        found = {key: self.cache.get(key) for key, _ in images}
        todo = [(key, data) for key, data in images if found[key] is None]
        if todo:
            for (key, _), rows in zip(todo, self.encode_uncached([data for _, data in todo])):
                found[key] = rows
                self.cache.put(key, rows)
        return [found[key] for key, _ in images]  # type: ignore[misc]


def rows_to_bytes(rows: torch.Tensor) -> bytes:
    return rows.float().contiguous().numpy().tobytes()


def rows_from_bytes(image: ImageInput, hidden: int) -> torch.Tensor:
    data = image.embedding
    if len(data) != image.embedding_bytes(hidden):
        raise ValueError(f"an image embedding of {len(data)} bytes is not [{image.num_tokens}, {hidden}] float32")
    return torch.frombuffer(bytearray(data), dtype=torch.float32).view(image.num_tokens, hidden)
