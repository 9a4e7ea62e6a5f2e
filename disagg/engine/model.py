"""Llama/Qwen-family decoder (RMSNorm, RoPE, GQA, SwiGLU, tied or untied embeddings) over a paged KV cache.

Loads an HF-format directory: `config.json` + `*.safetensors`.  Q/K/V and gate/up projections are fused at load
time (one matmul each); attention goes through the backend chosen once at start-up (see attention.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from disagg.engine.attention import AttentionBackend, AttentionMetadata
from disagg.engine.mm_inputs import InputEmbeds, embed_inputs
from disagg.engine.quant import QuantFactory, QuantLinear
from disagg.vision.spec import text_config
from disagg_kernels.cpu_quant import BlockFormat, quantize

SUPPORTED_MODEL_TYPES = {"llama", "qwen2", "mistral"}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: a model directory needs an HF config.json")
        cfg = text_config(json.loads(path.read_text()))  # a VLM's language model (disagg/vision/spec.py)
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported (only 'default')")
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", model_type == "mistral"):
            raise ValueError("sliding-window attention is not supported")
        eos = cfg.get("eos_token_id")
        num_heads = cfg["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads", num_heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )


class PackedLinear(nn.Module):
    """A linear layer whose weight is pre-packed once into oneDNN's blocked layout (CPU).

    Plain `F.linear` re-reads the row-major weight through a generic GEMM every step; the packed layout lets
    oneDNN stream it at close to memory bandwidth: measured 1.7x faster at batch 1 and 2.7-3.2x at batch 8-32 on
    this model's shapes (bench/engine_throughput.py, docs/benchmarks.md).  Results differ from `F.linear` only by
    float32 summation order.  Any batch size works with one packing; `batch_hint` picks oneDNN's blocking, and 8
    measured best across batches 1-32 (a 30-layer stack of this model's shapes: 12.2 / 15.6 / 30.6 ms per step
    at batch 1 / 8 / 32, against 17.7 / 26.3 / 42.8 ms packed for batch 1).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int = 8, batch_invariant: bool = False
    ) -> None:
        super().__init__()
        self.batch_invariant = batch_invariant
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = None if bias is None else bias.detach().clone()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight_bytes = weight.numel() * weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.batch_invariant and flat.shape[0] == 1:
            # oneDNN sums a lone row in another order than any batch of two or more (for inputs wider than 1024:
            # last-bit differences), so a token gets other bits alone than in a speculative verification - which
            # a quantized KV cache's rounding can magnify into another token.  Computed as two rows, every batch
            # size gives each row the same bits; it costs ~10% at batch 1, so only engines that need it ask.
            out = torch.ops.mkldnn._linear_pointwise(flat.expand(2, -1), self.packed, self.bias, "none", [], "")[:1]
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def _weight(module: nn.Module) -> torch.Tensor:
    assert isinstance(module, nn.Linear)
    return module.weight


def _bias(module: nn.Module) -> torch.Tensor | None:
    assert isinstance(module, nn.Linear)
    return module.bias


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; the same arithmetic as below, in float32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) RoPE, as HF Llama computes it."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj: nn.Module = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj: nn.Module = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.backend = backend

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # q and k rotated together (one set of kernels for both: per-step op count matters at small batches)
        qk = _rotate(
            qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin
        )
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv[:, 0], kv[:, 1]
        self.backend.write_kv(k_cache, v_cache, k, v, meta)
        out = self.backend.attend(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj: nn.Module = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj: nn.Module = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


# a VLM checkpoint's parts that are not the language model's (the vision encoder loads them: disagg/vision/)
_VISION_PARTS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
# a VLM's language-model prefixes (HF's saved form, then its in-memory form) -> ours
_LANGUAGE_PREFIXES = (
    ("language_model.model.", ""),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", ""),
)


def _language_model_name(name: str) -> str | None:
    """Our parameter name for a checkpoint tensor's name; None: not the language model's (or a rotary buffer)."""
    if "rotary_emb" in name or name.startswith(_VISION_PARTS):
        return None
    for prefix, ours in _LANGUAGE_PREFIXES:
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return name.removeprefix("model.")


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.lm_head: nn.Module | None = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        embeds: InputEmbeds | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] for the flattened batch; kv_cache is [blocks, layers, 2, BS, KVH, D].
        `embeds`: rows whose input is an image's embedding, not a token's (engine/mm_inputs.py)."""
        x = embed_inputs(self.embed_tokens, input_ids, embeds)
        cos, sin = self.rotary(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache[:, i], meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied: the embedding is the head
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def prepack(self, batch_invariant: bool = False) -> None:
        """Replace every linear layer (and a tied LM head) by a PackedLinear (CPU; after the final dtype cast).
        `batch_invariant`: every batch size computes a row with the same bits (see PackedLinear.forward)."""
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            inv = {"batch_invariant": batch_invariant}
            attn.qkv_proj = PackedLinear(_weight(attn.qkv_proj), _bias(attn.qkv_proj), **inv)
            attn.o_proj = PackedLinear(_weight(attn.o_proj), None, **inv)
            mlp.gate_up_proj = PackedLinear(_weight(mlp.gate_up_proj), None, **inv)
            mlp.down_proj = PackedLinear(_weight(mlp.down_proj), None, **inv)
        head = self.embed_tokens.weight if self.lm_head is None else _weight(self.lm_head)
        self.lm_head = PackedLinear(
            head, None, batch_invariant=batch_invariant
        )  # a tied head gets its own packed copy; the embedding stays

    @torch.no_grad()
    def quantize(self, factory: QuantFactory, fmt: BlockFormat) -> None:
        """Replace every linear layer (and the LM head) by a QuantLinear holding `fmt` blocks (--quantization)."""
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj = factory.from_float(attn.qkv_proj, fmt)
            attn.o_proj = factory.from_float(attn.o_proj, fmt)
            mlp.gate_up_proj = factory.from_float(mlp.gate_up_proj, fmt)
            mlp.down_proj = factory.from_float(mlp.down_proj, fmt)
        head = self.embed_tokens.weight if self.lm_head is None else _weight(self.lm_head)
        self.lm_head = factory.linear(quantize(head, fmt))  # tied: the head's blocks; the float embedding stays

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: every matrix once (the embedding lookup reads one row)."""
        total = 0
        for module in self.modules():
            if isinstance(module, (PackedLinear, QuantLinear)):
                total += module.weight_bytes
            elif isinstance(module, nn.Linear):
                total += module.weight.numel() * module.weight.element_size()
        if self.lm_head is None:
            total += self.embed_tokens.weight.numel() * self.embed_tokens.weight.element_size()
        return total

    # ------------------------------------------------------------------ weights
    def load_weights(self, model_dir: str | Path) -> None:
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {model_dir}")
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        fused = {  # HF name fragment -> (our name fragment, row offset, rows)
            "q_proj": ("qkv_proj", 0, q),
            "k_proj": ("qkv_proj", q, kv),
            "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, cfg.intermediate_size),
            "up_proj": ("gate_up_proj", cfg.intermediate_size, cfg.intermediate_size),
        }
        with torch.no_grad():
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        target = _language_model_name(name)
                        if target is None:
                            continue
                        if target == "lm_head.weight" and self.lm_head is None:
                            continue  # tied: the embedding is the head
                        tensor = f.get_tensor(name)
                        part = target.split(".")[-2]
                        if part in fused:
                            new_part, offset, rows = fused[part]
                            target = target.replace(part, new_part)
                            params[target][offset : offset + rows].copy_(tensor)
                            loaded.add(f"{target}:{part}")
                        elif target in params:
                            params[target].copy_(tensor)
                            loaded.add(target)
                        else:
                            raise ValueError(f"unexpected weight {name} in {file.name}")
        expected: set[str] = set()
        for name in params:
            part = name.split(".")[-2]
            if part in ("qkv_proj", "gate_up_proj"):
                frags = ["q_proj", "k_proj", "v_proj"] if part == "qkv_proj" else ["gate_proj", "up_proj"]
                expected.update(f"{name}:{frag}" for frag in frags)
            else:
                expected.add(name)
        missing = expected - loaded
        if missing:
            raise ValueError(f"weights missing from {model_dir}: {sorted(missing)[:5]}...")
