"""Configuration: one dataclass per component. Defaults run on a laptop CPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    """One inference engine (one worker)."""

    model: str = ""  # HF-format directory (config.json + *.safetensors); "" = the default model
    device: str = "auto"  # "auto" | "cpu" | "cuda"; resolved once at start-up
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on CUDA
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: as many as kv_cache_memory_mb holds
    kv_cache_memory_mb: int = 1024
    max_num_seqs: int = 64  # running requests at most
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill splits longer prompts)
    max_model_len: int = 2048  # prompt + output tokens; capped by the model's max_position_embeddings
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU; None = torch's default
    cpu_prepack: bool = True  # CPU: pre-pack linear weights for oneDNN (2-3x faster GEMMs at batch 8-32)
    kv_lease_timeout_s: float = 30.0  # blocks held for a reader are freed if no reader shows up in time
    kv_load_timeout_s: float = 10.0  # a KV load (peer read, disk) not done by then is recomputed instead

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_model_len <= 1:
            raise ValueError("max_model_len must be > 1")
