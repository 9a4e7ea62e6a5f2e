"""LoRA adapters in the engine: several adapters (and the base model) in one batch.

An adapter is a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`), as `peft` saves it.  Each
request names at most one (`protocol.LoRARef`); a step's rows are grouped by adapter and every adapted linear
layer adds `scale * (x A^T) B^T` of each token's own adapter to the base layer's output: the tokens gathered per
adapter, two batched matmuls over the step's adapters, the deltas added back at their tokens (torch: the same code
on CPU and GPU, the base layer - packed, quantized or plain - untouched).  The engine orders a step's rows by
adapter, so when every adapter has as many tokens as the next (an even mix of decodes), the groups are plain views
of the batch and the second matmul adds into the output in place: no gather, no scatter.  The fused projections
(q/k/v, gate/up) hold each part's B at its own output rows.

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
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from disagg.engine.model import ModelConfig
from disagg.models.adapters import WEIGHTS_FILE, AdapterError, adapter_config, parse_key, projection_shapes
from disagg.protocol import LoRARef

# a PEFT module -> the fused module of ours it is part of (model.py packs q/k/v and gate/up in this order)
FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "o_proj": "o_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "down_proj": "down_proj",
}


def part_shapes(mc: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """Per PEFT module: (input width, output rows, output offset in its fused module)."""
    shapes = projection_shapes(
        mc.hidden_size, mc.intermediate_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    )
    out, offset, fused = {}, 0, ""
    for module, (width, rows) in shapes.items():  # in packing order: a part starts where the last one ended
        offset = offset if FUSED[module] == fused else 0
        out[module], offset, fused = (width, rows, offset), offset + rows, FUSED[module]
    return out


@dataclass
class LoRAAdapter:
    name: str
    # (layer, our module) -> (A [r_total, in]: its parts' A stacked, B [out, r_total]: each part's scaled B at its
    # output rows, zeros elsewhere): one pair of matmuls per fused module
    fused: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def load(cls, ref: LoRARef, mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> LoRAAdapter:
        config = adapter_config(Path(ref.path))  # checked: r a positive int, alpha a number
        rank, alpha = config.get("r", 8), float(config.get("lora_alpha", 8))
        scale = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
        try:
            weights = load_file(str(Path(ref.path) / WEIGHTS_FILE))
        except (OSError, SafetensorError) as exc:
            raise AdapterError(f"{ref.name}: {WEIGHTS_FILE} is unreadable ({exc})") from None
        shapes = part_shapes(mc)
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            layer, module, which = parse_key(key, f"{ref.name}: ")
            if module not in FUSED:
                raise AdapterError(f"{ref.name}: adapts {module}, which this engine does not (only {', '.join(FUSED)})")
            if not 0 <= layer < mc.num_layers:
                raise AdapterError(f"{ref.name}: layer {layer} does not exist (the model has {mc.num_layers})")
            pairs.setdefault((layer, module), {})[which] = tensor
        parts: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
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
            parts.setdefault((layer, FUSED[module]), []).append((a.float(), b.float() * scale, offset))
        if not parts:
            raise AdapterError(f"{ref.name}: {WEIGHTS_FILE} holds no LoRA weights")
        out_rows: dict[str, int] = {}  # each fused module's height: where its last part ends
        for module, (_, rows, offset) in shapes.items():
            out_rows[FUSED[module]] = max(out_rows.get(FUSED[module], 0), offset + rows)
        adapter = cls(ref.name)
        for target, deltas in parts.items():
            a_f = torch.cat([a for a, _, _ in deltas])
            b_f = torch.zeros(out_rows[target[1]], a_f.shape[0])
            col = 0
            for a, b, offset in deltas:
                b_f[offset : offset + b.shape[0], col : col + a.shape[0]] = b
                col += a.shape[0]
            adapter.fused[target] = (a_f.to(device, dtype), b_f.to(device, dtype))
        return adapter


class AdapterCache:
    """Loaded adapters, at most `capacity` kept; `pin` marks the ones a step uses (never evicted during it)."""

    def __init__(self, capacity: int, mc: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.capacity, self.mc, self.device, self.dtype = capacity, mc, device, dtype
        self._loaded: OrderedDict[tuple[str, str, str], LoRAAdapter] = OrderedDict()
        self.loads = 0

    def get(self, ref: LoRARef, keep: set[tuple[str, str, str]]) -> LoRAAdapter:
        key = ref.key()
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
        return [name for name, _, _ in self._loaded]


@dataclass
class StepStack:
    """One set of adapters' matrices stacked per module, zero-padded to the set's largest rank there: A [G, in, R]
    and B [G, R, out] (an adapter that leaves a module alone: zeros).  Built once per set of adapters a step runs;
    consecutive decode steps usually run the same set."""

    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, adapters: list[LoRAAdapter]) -> StepStack:
        modules = {}
        for key in {k for adapter in adapters for k in adapter.fused}:
            present = [adapter.fused.get(key) for adapter in adapters]
            a0, b0 = next(pair for pair in present if pair is not None)
            rank = max(pair[0].shape[0] for pair in present if pair is not None)
            a_stack = a0.new_zeros(len(adapters), a0.shape[1], rank)
            b_stack = b0.new_zeros(len(adapters), rank, b0.shape[0])
            for g, pair in enumerate(present):
                if pair is not None:
                    a_stack[g, :, : pair[0].shape[0]] = pair[0].T
                    b_stack[g, : pair[1].shape[1]] = pair[1].T
            modules[key] = (a_stack, b_stack)
        return cls(modules)


@dataclass
class LoRAContext:
    """This step's adapters (None: the base model alone) and its tokens grouped by adapter: `rows` [G * Tmax] holds
    each group's flat token indices, padded to the largest group (with token 0: its padded results are dropped);
    `kept` are the positions in `rows` of real tokens and `targets` those tokens, in the same order.  `uniform` > 0:
    the groups are the step's first tokens, in order, `uniform` tokens each (the engine orders rows by adapter, so
    an even mix lands here): the layers then read and write them in place, with no gather and no scatter."""

    stack: StepStack | None = None
    groups: int = 0
    uniform: int = 0
    rows: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    targets: torch.Tensor | None = None


class LoRALinear(nn.Module):
    """A linear layer plus this step's adapters' deltas, each on its own tokens: the tokens gathered per adapter
    (padded to the largest group), two batched matmuls over the adapters (bmm: no work spent on another adapter's
    tokens), the deltas added back where their tokens are."""

    def __init__(self, base: nn.Module, layer: int, module: str, context: LoRAContext) -> None:
        super().__init__()
        self.base, self.key, self.context = base, (layer, module), context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ctx = self.context
        entry = ctx.stack.modules.get(self.key) if ctx.stack is not None else None
        if entry is None or ctx.rows is None or ctx.kept is None or ctx.targets is None:
            return out
        a_stack, b_stack = entry
        if ctx.uniform and out.is_contiguous():
            n = ctx.groups * ctx.uniform
            h = torch.bmm(x[:n].reshape(ctx.groups, ctx.uniform, x.shape[1]), a_stack)
            out[:n].view(ctx.groups, ctx.uniform, out.shape[1]).baddbmm_(h, b_stack)
            return out
        grouped = x.index_select(0, ctx.rows).view(ctx.groups, -1, x.shape[1])  # [G, Tmax, in]
        delta = torch.bmm(torch.bmm(grouped, a_stack), b_stack).view(-1, out.shape[1])
        return out.index_add_(0, ctx.targets, delta.index_select(0, ctx.kept))


class LoRARuntime:
    """What the model runner holds: the adapter cache and the context its wrapped layers read."""

    def __init__(
        self, capacity: int, mc: ModelConfig, device: torch.device, dtype: torch.dtype, *, in_place: bool = True
    ) -> None:
        self.cache = AdapterCache(capacity, mc, device, dtype)
        self.context = LoRAContext()
        self.device = device
        # off in a batch-invariant runner: the in-place and gathered paths round differently, and a verify step
        # (gathered) must give a row the bits a plain decode step gives it
        self.in_place = in_place
        self._attached = False
        self._stacked: tuple[tuple[tuple[str, str, str], ...], StepStack] | None = None  # the last set's stack

    def bind(self, model: nn.Module, refs: list[LoRARef | None], query_start: list[int]) -> None:
        """This step's adapters and their tokens (row i of the batch covers flat tokens query_start[i:i+2])."""
        groups: dict[tuple[str, str, str], list[int]] = {}
        wanted: dict[tuple[str, str, str], LoRARef] = {}
        for i, ref in enumerate(refs):
            if ref is not None:
                key = ref.key()
                wanted.setdefault(key, ref)
                groups.setdefault(key, []).extend(range(query_start[i], query_start[i + 1]))
        if not groups:
            self.context.stack = self.context.rows = self.context.kept = self.context.targets = None
            self.context.uniform = 0
            return
        if not self._attached:
            attach(model, self.context)
            self._attached = True
        keys = tuple(sorted(groups))  # the same set in any batch order: the same stack
        adapters = [self.cache.get(wanted[k], set(keys)) for k in keys]  # loaded (or kept) for this step
        if self._stacked is None or self._stacked[0] != keys:
            self._stacked = (keys, StepStack.of(adapters))
        width = max(len(g) for g in groups.values())
        rows: list[int] = []
        kept: list[int] = []
        targets: list[int] = []
        for k in keys:
            kept.extend(range(len(rows), len(rows) + len(groups[k])))
            targets.extend(groups[k])
            rows.extend(groups[k] + [0] * (width - len(groups[k])))
        ctx, dev = self.context, self.device
        ctx.stack, ctx.groups = self._stacked[1], len(keys)
        in_place = targets == list(range(len(targets))) and all(len(g) == width for g in groups.values())
        ctx.uniform = width if in_place and self.in_place else 0
        ctx.rows, ctx.kept, ctx.targets = (
            torch.tensor(v, dtype=torch.int64, device=dev) for v in (rows, kept, targets)
        )


def attach(model: nn.Module, context: LoRAContext) -> None:
    """Wrap every decoder layer's four projections (already packed or quantized) so they read `context`."""
    for i, layer in enumerate(model.layers):  # type: ignore[attr-defined, arg-type]  # CausalLM's
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = LoRALinear(attn.qkv_proj, i, "qkv_proj", context)
        attn.o_proj = LoRALinear(attn.o_proj, i, "o_proj", context)
        mlp.gate_up_proj = LoRALinear(mlp.gate_up_proj, i, "gate_up_proj", context)
        mlp.down_proj = LoRALinear(mlp.down_proj, i, "down_proj", context)
