"""Start-up capacity checks: how many KV blocks a config holds, and refusing a model or cache that cannot fit - a
clear error naming the option before any weight is loaded, never a failure mid-request."""

from __future__ import annotations

from pathlib import Path

import torch

from disagg.config import EngineConfig
from disagg.engine.kv_cache import bytes_per_block
from disagg.engine.kv_format import KVFormat
from disagg.engine.model import ModelConfig


def kv_blocks(config: EngineConfig, model_config: ModelConfig, fmt: KVFormat) -> int:
    """KV blocks of config.block_size tokens: config.num_blocks, else what config.kv_cache_memory_mb holds (in
    the KV format: an int8 cache holds about 3.9x the blocks of a float32 one)."""
    return config.num_blocks or (config.kv_cache_memory_mb << 20) // bytes_per_block(
        model_config, config.block_size, fmt
    )


def check_kv_capacity(num_blocks: int, block_size: int, max_model_len: int) -> None:
    if num_blocks * block_size < max_model_len:
        raise ValueError(
            f"KV cache of {num_blocks} blocks x {block_size} tokens cannot hold one sequence of "
            f"max_model_len={max_model_len}; raise num_blocks or lower max_model_len"
        )


def param_count(mc: ModelConfig) -> int:
    """Parameters of a Llama/Qwen-family model of this shape (norms and biases included)."""
    h, q, kv = mc.hidden_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * mc.intermediate_size + 2 * h
    if mc.attention_bias:
        layer += q + 2 * kv
    head = 0 if mc.tie_word_embeddings else mc.vocab_size * h
    return mc.vocab_size * h + head + mc.num_layers * layer + h


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none to read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(
    mc: ModelConfig, bytes_per_param: float, kv_bytes: int, device: torch.device, available: int | None
) -> None:
    """Refuse at start-up a model that cannot load in this machine's memory (CPU), with the figures."""
    if device.type != "cpu" or available is None:
        return
    weights = param_count(mc) * bytes_per_param  # while loading: float32 unless served from GGUF blocks
    if weights + kv_bytes > available:
        raise ValueError(
            f"the model needs about {(weights + kv_bytes) / 2**30:.1f} GiB to load ({param_count(mc) / 1e6:.0f}M "
            f"parameters at {bytes_per_param:g} bytes, plus {kv_bytes / 2**30:.1f} GiB of KV cache) but "
            f"{available / 2**30:.1f} GiB is available: lower --kv-cache-mb, or serve a GGUF file with "
            "--quantization q4"
        )
