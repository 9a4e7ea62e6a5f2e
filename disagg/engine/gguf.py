"""Serving a GGUF file's own blocks (`--quantization q4`): the Llama/Qwen2 tensors of a llama.cpp model file,
mapped onto `CausalLM` without de-quantizing the matrices.

GGUF names and layouts (llama.cpp's convert_hf_to_gguf.py): `token_embd`, `blk.N.attn_{q,k,v,output}`,
`blk.N.ffn_{gate,up,down}`, `blk.N.{attn,ffn}_norm`, `output_norm`, `output` (absent when tied).  Matrices are
stored row-major as [out, in] rows of blocks, so fusing q/k/v (and gate/up) is a row concatenation.  For Llama the
converter permutes the rows of q and k within each head (its RoPE pairs adjacent elements, HF's pairs the two
halves); that is undone here by reordering whole rows, which leaves every block intact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor
from torch import nn

from disagg.engine.model import CausalLM, DecoderLayer
from disagg.engine.quant import QuantFactory
from disagg_kernels.cpu_quant import QK, BlockFormat, BlockWeight

# block type -> (our format, bytes per block of 32)
_BLOCKS = {
    GGMLQuantizationType.Q4_0: (BlockFormat.Q4_0, 18),
    GGMLQuantizationType.Q4_1: (BlockFormat.Q4_1, 20),
    GGMLQuantizationType.Q8_0: (BlockFormat.Q8_0, 34),
}
_DENSE = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
_ROPE_PERMUTED = {"llama", "mistral"}  # architectures whose q/k rows the converter permutes


class GGUFWeights:
    """The tensors of one GGUF file, read lazily (the reader memory-maps the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = GGUFReader(str(path))
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self.reader.tensors}
        field = self.reader.fields.get("general.architecture")
        self.architecture = bytes(field.parts[-1]).decode() if field is not None else ""

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _get(self, name: str) -> ReaderTensor:
        if name not in self.tensors:
            raise ValueError(f"{self.path.name}: tensor {name!r} missing")
        return self.tensors[name]

    def dense(self, name: str) -> torch.Tensor:
        t = self._get(name)
        if t.tensor_type not in _DENSE:
            raise ValueError(f"{self.path.name}: {name} is {t.tensor_type.name}; a float tensor was expected")
        return torch.from_numpy(np.asarray(t.data, dtype=np.float32).reshape(-1).copy())

    def blocks(self, name: str) -> BlockWeight:
        t = self._get(name)
        if t.tensor_type not in _BLOCKS:
            supported = ", ".join(k.name for k in _BLOCKS)
            raise ValueError(f"{self.path.name}: {name} is {t.tensor_type.name}; --quantization q4 runs {supported}")
        fmt, size = _BLOCKS[t.tensor_type]
        k, n = (int(x) for x in t.shape[:2])  # GGUF lists dimensions innermost first
        raw = np.asarray(t.data, dtype=np.uint8).reshape(n, k // QK, size)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if fmt is BlockFormat.Q4_1 else None
        codes = raw[..., 4 if m is not None else 2 :].reshape(n, -1)
        return BlockWeight(
            fmt,
            torch.from_numpy(codes.copy()),
            torch.from_numpy(d),
            None if m is None else torch.from_numpy(m),
            (n, k),
        )


def _unpermute(w: BlockWeight, heads: int) -> BlockWeight:
    """Undo the converter's per-head row order (head, half, pair) -> HF's (head, pair, half)."""
    n = w.shape[0]
    order = torch.arange(n).view(heads, n // heads // 2, 2).transpose(1, 2).reshape(-1)
    return w.permute_rows(order)


def load_gguf(model: CausalLM, path: Path, factory: QuantFactory) -> None:
    """Replace every matrix of `model` (built on the meta device) by its GGUF blocks and load the norms."""
    g = GGUFWeights(path)
    cfg = model.config
    permuted = g.architecture in _ROPE_PERMUTED
    embed = g.blocks("token_embd.weight")
    if embed.shape != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(
            f"{path.name}: token_embd is {embed.shape}, config.json says {cfg.vocab_size}x{cfg.hidden_size}"
        )
    for i, layer in enumerate(model.layers):
        assert isinstance(layer, DecoderLayer)
        p = f"blk.{i}."
        q, k = g.blocks(p + "attn_q.weight"), g.blocks(p + "attn_k.weight")
        if permuted:
            q, k = _unpermute(q, cfg.num_heads), _unpermute(k, cfg.num_kv_heads)
        qkv = BlockWeight.concat([q, k, g.blocks(p + "attn_v.weight")])
        bias = None
        if g.has(p + "attn_q.bias"):
            bias = torch.cat([g.dense(p + f"attn_{x}.bias") for x in "qkv"])
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = factory.linear(qkv, bias)
        attn.o_proj = factory.linear(g.blocks(p + "attn_output.weight"))
        mlp.gate_up_proj = factory.linear(
            BlockWeight.concat([g.blocks(p + "ffn_gate.weight"), g.blocks(p + "ffn_up.weight")])
        )
        mlp.down_proj = factory.linear(g.blocks(p + "ffn_down.weight"))
        layer.input_layernorm.weight = nn.Parameter(g.dense(p + "attn_norm.weight"), requires_grad=False)
        layer.post_attention_layernorm.weight = nn.Parameter(g.dense(p + "ffn_norm.weight"), requires_grad=False)
    model.norm.weight = nn.Parameter(g.dense("output_norm.weight"), requires_grad=False)
    # the embedding is a lookup, like nn.Embedding; tied, it reads the head's matrix (packed or not), not a copy
    if g.has("output.weight"):
        model.lm_head = factory.linear(g.blocks("output.weight"))
        model.embed_tokens = factory.embedding(embed)  # type: ignore[assignment]
    else:
        head = factory.linear(embed)
        model.lm_head = head
        model.embed_tokens = factory.embedding(embed, head=head)  # type: ignore[assignment]
    del embed  # the head or the embedding holds it (or, packed, nobody)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{path.name}: no GGUF tensor for {left[:5]}")
