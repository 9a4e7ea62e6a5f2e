"""LoRA adapters in the engine: several adapters (and the base model) in one batch.

An adapter is a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`), as `peft` saves it.  Each
request names at most one (`protocol.LoRARef`); a step's rows are grouped by adapter and every adapted linear
layer adds, per group, `scale * (x A^T) B^T` to the base layer's output for that group's rows only (grouped
matmuls in torch: the same code on CPU and GPU, the base layer - packed, quantized or plain - untouched).  The
fused projections (q/k/v, gate/up) take each part's delta at its own output rows.

Adapters load on first use into a bounded per-worker cache (`AdapterCache`, least recently used out first; an
adapter a step needs is never evicted during it).  The layers are wrapped on the first step that uses an adapter,
so an engine that never serves one pays nothing.  What a directory must satisfy is checked at load, with the
problem named (models/adapters.py checks the same before the router serves an adapter): the files exist, the
format is plain LoRA, every target is one of the seven projections, and every tensor's shape fits this model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from disagg.engine.model import ModelConfig
from disagg.models.adapters import WEIGHTS_FILE, AdapterError, adapter_config
from disagg.protocol import LoRARef

# a PEFT module -> (our fused module, which part of it)
PARTS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}


def part_shapes(mc: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """Per PEFT module: (input width, output rows, output offset in its fused module)."""
    q, kv, h, inter = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.hidden_size, mc.intermediate_size
    return {
        "q_proj": (h, q, 0),
        "k_proj": (h, kv, q),
        "v_proj": (h, kv, q + kv),
        "o_proj": (q, h, 0),
        "gate_proj": (h, inter, 0),
        "up_proj": (h, inter, inter),
        "down_proj": (inter, h, 0),
    }


@dataclass
class LoRAAdapter:
    name: str
    # (layer, our module) -> [(A [r, in], B scaled [out_part, r], output offset)]
    deltas: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, int]]] = field(default_factory=dict)

    @classmethod
    def load(cls, ref: LoRARef, mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> LoRAAdapter:
        config = adapter_config(Path(ref.path))
        rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
        scale = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
        weights = load_file(str(Path(ref.path) / WEIGHTS_FILE))
        shapes = part_shapes(mc)
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            layer, module, which = _parse_key(key)
            if module not in PARTS:
                raise AdapterError(f"{ref.name}: adapts {module}, which this engine does not (only {', '.join(PARTS)})")
            if not 0 <= layer < mc.num_layers:
                raise AdapterError(f"{ref.name}: layer {layer} does not exist (the model has {mc.num_layers})")
            pairs.setdefault((layer, module), {})[which] = tensor
        adapter = cls(ref.name)
        for (layer, module), pair in sorted(pairs.items()):
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"{ref.name}: layer {layer} {module} lacks its lora_{'B' if 'A' in pair else 'A'}")
            width, rows, offset = shapes[module]
            a, b = pair["A"], pair["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != width or b.shape[0] != rows or a.shape[0] != b.shape[1]:
                raise AdapterError(
                    f"{ref.name}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, but this model "
                    f"needs A (r, {width}) and B ({rows}, r): an adapter of another base model?"
                )
            target = PARTS[module][0]
            delta = (a.to(device, dtype), (b.float() * scale).to(device, dtype), offset)
            adapter.deltas.setdefault((layer, target), []).append(delta)
        if not adapter.deltas:
            raise AdapterError(f"{ref.name}: {WEIGHTS_FILE} holds no LoRA weights")
        return adapter


def _parse_key(key: str) -> tuple[int, str, str]:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> (3, "q_proj", "A")."""
    parts = key.split(".")
    try:
        at = parts.index("layers")
        which = {"lora_A": "A", "lora_B": "B"}[parts[-2]]
        return int(parts[at + 1]), parts[-3], which
    except (ValueError, KeyError, IndexError):
        raise AdapterError(f"unexpected tensor {key!r} in {WEIGHTS_FILE}") from None


class AdapterCache:
    """Loaded adapters, at most `capacity` kept; `pin` marks the ones a step uses (never evicted during it)."""

    def __init__(self, capacity: int, mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.capacity, self.mc, self.device, self.dtype = capacity, mc, device, dtype
        self._loaded: OrderedDict[tuple[str, str], LoRAAdapter] = OrderedDict()
        self.loads = 0

    def get(self, ref: LoRARef, keep: set[tuple[str, str]]) -> LoRAAdapter:
        key = (ref.name, ref.path)
        adapter = self._loaded.get(key)
        if adapter is None:
            adapter = LoRAAdapter.load(ref, self.mc, self.device, self.dtype)
            self.loads += 1
            self._loaded[key] = adapter
            for old in [k for k in self._loaded if k not in keep and k != key][
                : max(0, len(self._loaded) - self.capacity)
            ]:
                del self._loaded[old]
        self._loaded.move_to_end(key)
        return adapter

    def resident(self) -> list[str]:
        return [name for name, _ in self._loaded]


@dataclass
class LoRAContext:
    """This step's groups: an adapter and the flat token rows that run with it (empty: base model only)."""

    groups: list[tuple[LoRAAdapter, torch.Tensor]] = field(default_factory=list)


class LoRALinear(nn.Module):
    """A linear layer plus this step's adapters' deltas on their rows."""

    def __init__(self, base: nn.Module, layer: int, module: str, context: LoRAContext) -> None:
        super().__init__()
        self.base, self.key, self.context = base, (layer, module), context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for adapter, rows in self.context.groups:
            deltas = adapter.deltas.get(self.key)
            if not deltas:
                continue
            xs = x[rows]
            for a, b, offset in deltas:
                out[rows, offset : offset + b.shape[0]] += (xs @ a.T) @ b.T
        return out


class LoRARuntime:
    """What the model runner holds: the adapter cache and the context its wrapped layers read."""

    def __init__(self, capacity: int, mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cache = AdapterCache(capacity, mc, device, dtype)
        self.context = LoRAContext()
        self.device = device
        self._attached = False

    def bind(self, model: nn.Module, refs: list[LoRARef | None], query_start: list[int]) -> None:
        """Group this step's rows by adapter (row i of the batch covers flat tokens query_start[i:i+2])."""
        rows: dict[tuple[str, str], list[int]] = {}
        wanted: dict[tuple[str, str], LoRARef] = {}
        for i, ref in enumerate(refs):
            if ref is not None:
                key = (ref.name, ref.path)
                wanted[key] = ref
                rows.setdefault(key, []).extend(range(query_start[i], query_start[i + 1]))
        if rows and not self._attached:
            attach(model, self.context)
            self._attached = True
        keep = set(wanted)
        self.context.groups = [
            (self.cache.get(wanted[key], keep), torch.tensor(r, dtype=torch.int64, device=self.device))
            for key, r in rows.items()
        ]


def attach(model: nn.Module, context: LoRAContext) -> None:
    """Wrap every decoder layer's four projections (already packed or quantized) so they read `context`."""
    for i, layer in enumerate(model.layers):  # type: ignore[attr-defined, arg-type]  # CausalLM's
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = LoRALinear(attn.qkv_proj, i, "qkv_proj", context)
        attn.o_proj = LoRALinear(attn.o_proj, i, "o_proj", context)
        mlp.gate_up_proj = LoRALinear(mlp.gate_up_proj, i, "gate_up_proj", context)
        mlp.down_proj = LoRALinear(mlp.down_proj, i, "down_proj", context)
