"""The native step: a whole step's decoder stack in one C++ call, for a CPU model's small steps.

At batch 1 the ~20 small torch ops of each layer (norms, RoPE, the KV scatter, the paged gather, SDPA, SiLU,
residuals) cost more than the layer's weight matmuls; `disagg_kernels/cpu_step.cpp` runs the 30 layers in one
call over the block kernels and the same paged cache (docs/benchmarks.md, quantized weights).  The matrices are a
quantized model's blocks (`--quantization`, with `--quant-activations`), or a float32 model's own matrices read in
place as F32 blocks (`float_layers`: taken before prepacking, which keeps oneDNN's packed copies for wide steps).

Which steps take it (`NativeStep.takes`): at most `QuantConfig.direct_rows` tokens (`float_rows` for a float32
model, where oneDNN's packed GEMM wins on wider steps; decode rows, a proposal under
verification, a short prefill chunk: every token attends as a decode row over its own prefix, as
`TorchAttentionBackend` does for verified rows), no LoRA row.  `build` returns None where it does not apply - a
GPU, an fp8 or bfloat16 KV cache (--kv-dtype), bfloat16 compute, no C++ compiler (the torch reference kernels) -
and the torch path serves those as before.

An int8 KV cache (`--kv-dtype int8`) is written and read by the step itself (`cpu_kv8.h`: KVFormat's bytes) for a
quantized model without LoRA adapters, and then the step takes every step, whatever its width.  Such an engine
promises every row the same bits whatever the step's row count (runner.py: the cache's rounding would turn a
last-bit difference into another token), and the step keeps it on its own - each row's matmuls, attention and
norms run in one order - where a prompt chunk on the torch path beside decode rows on the step would not.  A
float32 model's wide steps would run its row-by-row float kernel, so it keeps the torch path with any encoded
cache.  A step that carries a LoRA row runs on the torch path, as with every cache: with an int8 cache, the rows
batched beside a LoRA row get the torch path's bits for that step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeAlias

import torch
from torch import nn

from disagg.engine.attention import AttentionMetadata
from disagg.engine.kv_cache import KVCache
from disagg.engine.mm_inputs import InputEmbeds, embed_inputs
from disagg.engine.model import CausalLM, DecoderLayer, RMSNorm
from disagg.engine.quant import BlockKernels, QuantConfig, QuantKernels, QuantLinear, quant_kernels
from disagg.engine.sequence import Sequence
from disagg.modes import KVDtype
from disagg_kernels.cpu_quant import BlockWeight, NativeKernels, PanelWeight, float_blocks
from disagg_kernels.cpu_step import StackKernel, StackLayer, StackShape

Matrix: TypeAlias = BlockWeight | PanelWeight  # a matrix as the stack kernel reads it: row layout or packed panels


class NativeStep:
    """The stack kernel bound to one model and cache, and the rule for which steps it serves."""

    def __init__(self, model: CausalLM, kernel: StackKernel, max_tokens: int) -> None:
        self.model, self.kernel, self.max_tokens = model, kernel, max_tokens

    def takes(self, num_tokens: int, seqs: list[Sequence]) -> bool:
        return num_tokens <= self.max_tokens and all(seq.lora is None for seq in seqs)

    def _inputs(
        self, ids: torch.Tensor, meta: AttentionMetadata, embeds: InputEmbeds | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        starts = meta.query_start_list
        rows = [row for row in range(len(starts) - 1) for _ in range(starts[row + 1] - starts[row])]
        hidden = embed_inputs(self.model.embed_tokens, ids, embeds).float().contiguous()
        return hidden, torch.tensor(rows, dtype=torch.int64)

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, embeds: InputEmbeds | None = None
    ) -> torch.Tensor:
        """The final-normed hidden states [T, hidden], as `CausalLM.forward` returns them."""
        hidden, rows = self._inputs(ids, meta, embeds)
        return self.kernel.forward(hidden, positions, meta.block_tables, rows)

    @property
    def native(self) -> NativeKernels:
        """The native kernels the step calls (the runner scans its logits with them too)."""
        return self.kernel.native

    @property
    def holds_head(self) -> bool:
        """Whether the kernel holds the LM head (a quantized model's, packed into panels): `logits` runs then."""
        return self.kernel.has_head

    def logits(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        pick: list[int],
        embeds: InputEmbeds | None = None,
    ) -> tuple[torch.Tensor, list[int], list[bool]]:
        """The logits of tokens `pick` [len(pick), vocab] and their scan (a LogitScan's), the step and the LM head
        in one call; only where `holds_head`.  The same bits as `forward` then the model's `compute_logits`: the
        head's product is QuantLinear's."""
        hidden, rows = self._inputs(ids, meta, embeds)
        return self.kernel.forward_logits(hidden, positions, meta.block_tables, rows, pick)


def _stack_layer(layer: DecoderLayer, blocks_of: Callable[[nn.Module], Matrix | None]) -> StackLayer | None:
    """One decoder layer as the stack kernel reads it, its four matrices as `blocks_of` gives them (None: a matrix
    the kernel cannot read, so the model takes the torch path)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = (blocks_of(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
    if qkv is None or o is None or gate_up is None or down is None:
        return None
    bias = attn.qkv_proj.bias
    return StackLayer(
        input_norm=layer.input_layernorm.weight.data,
        post_norm=layer.post_attention_layernorm.weight.data,
        qkv=qkv,
        o=o,
        gate_up=gate_up,
        down=down,
        qkv_bias=None if bias is None else bias.data,  # type: ignore[union-attr]
    )


def _quant_blocks(module: nn.Module) -> Matrix | None:
    """A quantized linear's own blocks (packed into panels with int16 activations), when the native kernels run
    it."""
    if not isinstance(module, QuantLinear) or not isinstance(module.kernels, QuantKernels):
        return None
    return module.weight_blocks if module.kernels.native is not None else None


def _float_blocks(module: nn.Module) -> BlockWeight | None:
    """A float32 CPU linear's matrix as F32 blocks (its own memory: no copy)."""
    if not isinstance(module, nn.Linear) or module.weight.dtype != torch.float32 or not module.weight.is_cpu:
        return None
    return float_blocks(module.weight.data)


def _layers(model: CausalLM, blocks_of: Callable[[nn.Module], Matrix | None]) -> list[StackLayer] | None:
    layers = []
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        stack_layer = _stack_layer(layer, blocks_of)
        if stack_layer is None:
            return None
        layers.append(stack_layer)
    return layers


def float_layers(model: CausalLM) -> list[StackLayer] | None:
    """A float32 CPU model's layers as F32 blocks over its own matrices (no copy), taken before prepacking replaces
    the linear modules: the native step reads them, oneDNN's packed copies serve the wider steps."""
    return _layers(model, _float_blocks)


def build(
    model: CausalLM,
    cache: KVCache,
    config: QuantConfig,
    kernels: BlockKernels | None,
    layers: list[StackLayer] | None = None,
) -> NativeStep | None:
    """The native step for this model and cache, or None where it does not apply (module docstring).  `kernels`:
    the runner's block kernels (a quantized model's linears run them; None: a float32 model, which loads the
    CPU's only once the step applies); `layers`: a float32 model's (`float_layers`); None: the quantized model's
    own block matrices."""
    if cache.tensor.device.type != "cpu" or cache.format.compute != torch.float32:
        return None
    int8_kv = cache.format.kind is KVDtype.INT8
    if cache.tensor.dtype != torch.float32 and not int8_kv:  # fp8, bfloat16: the torch path's codecs
        return None
    if int8_kv and layers is not None:  # see the module docstring
        return None
    floats = layers is not None
    if layers is None:
        layers = _layers(model, _quant_blocks)
    if layers is None:  # a matrix the kernel cannot read (bfloat16, ...): the torch path serves, nothing is built
        return None
    if kernels is None:
        kernels = quant_kernels(cache.tensor.device)
    native = kernels.native if isinstance(kernels, QuantKernels) else None
    if native is None:  # no compiler: the torch path serves
        return None
    assert isinstance(model.norm, RMSNorm)
    cfg = model.config
    shape = StackShape(
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        heads=cfg.num_heads,
        kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        block_size=cache.block_size,
        eps=cfg.rms_norm_eps,
        activation_bits=config.activation_bits,
        blocked_rows=config.blocked_from,
    )
    lm_head = model.lm_head
    try:
        kernel = StackKernel(
            native, shape, layers, model.rotary.inv_freq, model.norm.weight.data, cache.tensor, kv_int8=int8_kv
        )
        if isinstance(lm_head, QuantLinear) and isinstance(lm_head.weight_blocks, PanelWeight):
            kernel.set_head(lm_head.weight_blocks, lm_head.bias)  # with panels, one product whatever the rows
    except ValueError:  # a layout the kernel does not read (non-contiguous blocks, another dtype): the torch path
        return None
    widest = sys.maxsize if int8_kv else config.float_rows if floats else config.direct_rows  # int8: every width
    return NativeStep(model, kernel, widest)
