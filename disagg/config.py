"""Configuration: one dataclass per component. Defaults run on a laptop CPU.

A field's help is its `metadata["help"]`: the CLIs generate their options from these fields (disagg/options.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.modes import Activations, KVDtype, Quantization, SpecMethod, parse_mode

# KV cache per worker (MiB) where a CLI runs several workers on one machine: named per-CLI overrides of
# EngineConfig.kv_cache_memory_mb (sized for one engine alone: `disagg generate`, the library)
SERVE_KV_CACHE_MB = 512  # `disagg serve`: every worker of the cluster, next to the router, on one host
LAB_KV_CACHE_MB = 256  # the lab's real clusters (bench compare, calibrate, machine, overload, trace_overhead) and
# the simulator sized like them (bench simulate, disagg plan)


def _help(text: str, **more: object) -> dict[str, object]:
    return {"help": text, **more}


@dataclass
class FaultConfig:
    """Faults a worker's engine injects for chaos drills and tests (disagg/engine/faults.py); every default
    injects nothing, and EngineConfig.faults None (the default) turns injection off altogether."""

    corrupt_layer: int = -1  # scale this decoder layer's weights by corrupt_scale at load time (-1: none)
    corrupt_scale: float = 4.0
    nan_every: int = 0  # NaN logits on every nth model step (0: never)
    nan_from_step: int = -1  # NaN logits on every model step from this one on (-1: never)
    slow_factor: float = 1.0  # each model step takes this many times as long (1.0: as measured)

    def __post_init__(self) -> None:
        if self.nan_every < 0 or self.slow_factor < 1.0:
            raise ValueError("nan_every must be >= 0 and slow_factor >= 1")


@dataclass
class EngineConfig:
    """One inference engine (one worker)."""

    model: str = field(
        default="", metadata=_help('HF-format model directory (config.json + *.safetensors); "": the default model')
    )
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda; resolved once at start-up"))
    dtype: str = field(default="auto", metadata=_help("auto: float32 on CPU, bfloat16 on CUDA"))
    block_size: int = field(default=16, metadata=_help("tokens per KV block"))
    num_blocks: int | None = field(default=None, metadata=_help("KV blocks (none: as many as the KV cache holds)"))
    kv_cache_memory_mb: int = field(default=1024, metadata=_help("KV cache per worker, MiB", flag="--kv-cache-mb"))
    max_num_seqs: int = field(default=64, metadata=_help("running requests at most"))
    max_num_batched_tokens: int = field(
        default=512, metadata=_help("per-step token budget (chunked prefill splits longer prompts)")
    )
    max_model_len: int = field(
        default=2048, metadata=_help("prompt + output tokens; capped by the model's max_position_embeddings")
    )
    enable_prefix_caching: bool = field(default=True, metadata=_help("reuse the KV blocks of shared prefixes"))
    num_threads: int | None = field(
        default=None, metadata=_help("torch intra-op threads on CPU (none: torch's default)", flag="--threads")
    )
    quantization: str = field(
        default="none",
        metadata=_help(
            "weights: none | int8 (Q8_0 blocks rounded at load) | q4 (the model's GGUF blocks served as they are; "
            "a model with no GGUF file is rounded to Q4_1); CPU, float32 activations"
        ),
    )
    quant_activations: str = field(
        default="float32",
        metadata=_help(
            "what quantized weights multiply in decode steps: float32 | int16 (each block of 32 activations "
            "rounded to int16: integer dot products, float32's precision) | int8 (rounded to int8 as llama.cpp "
            "does: fastest, lossy); CPU, with --quantization int8 or q4"
        ),
    )
    quant_repack: bool = field(
        default=True,
        metadata=_help(
            "with --quant-activations int16: pack each weight matrix once at load into panels of 16 output "
            "columns that the int16 kernel streams (AVX-512 VNNI; as llama.cpp repacks Q4_0), which replace the "
            "row layout; --no-quant-repack keeps the row layout and its kernels"
        ),
    )
    kv_dtype: str = field(
        default="auto",
        metadata=_help(
            "KV cache: auto (the model's dtype) | float32 | bfloat16 | int8 | fp8 (int8 and fp8: one byte per "
            "value and a scale per token and head, about 3.9x fewer bytes than float32 to hold, move and store)"
        ),
    )
    speculative: str = field(
        default="none",
        metadata=_help(
            "speculative decoding: none | ngram (proposals looked up in the request's own tokens, verified in the "
            "decode step; greedy requests)"
        ),
    )
    num_speculative_tokens: int = field(default=4, metadata=_help("most tokens proposed per step (1-16)"))
    max_loras: int = field(
        default=4, metadata=_help("LoRA adapters kept loaded per worker (least recently used out; 0: none served)")
    )
    cpu_prepack: bool = field(
        default=True, metadata=_help("CPU: pre-pack linear weights for oneDNN (2-3x faster GEMMs at batch 8-32)")
    )
    prefill_chunk_target_ms: float = field(
        default=0.0,
        metadata=_help(
            "size the prompt chunks that share a step with decodes so the step's predicted time (the engine's own "
            "fitted step-time model) stays within this many ms: the TPOT SLO, or a little under it; 0: fixed "
            "--max-num-batched-tokens chunks"
        ),
    )
    min_prefill_chunk: int = field(
        default=32, metadata=_help("prompt tokens a step may always carry beside decodes (prompts always progress)")
    )
    # the step-time model behind prefill_chunk_target_ms and the router's prefill rate: the last this many model
    # steps, refitted every step_fit_every steps
    step_fit_window: int = field(default=256, metadata={"cli": False})
    step_fit_every: int = field(default=16, metadata={"cli": False})
    kv_lease_timeout_s: float = field(
        default=30.0, metadata=_help("blocks held for a reader are freed if no reader shows up in time")
    )
    kv_load_timeout_s: float = field(
        default=10.0, metadata=_help("a KV load (peer read, disk) not done by then is recomputed instead")
    )
    # a KV source measured slower than recomputing is skipped, but every this many skips it is loaded anyway, so
    # its measurement can recover
    kv_probe_every: int = field(default=50, metadata={"cli": False})
    # the measured prefill speed (seconds per token, routing's recompute cost) is an EWMA: the newest step weighs
    # this much, so one noisy step moves the estimate little
    prefill_ewma_alpha: float = field(default=0.2, metadata={"cli": False})
    # injected faults (chaos drills, tests); None: none
    faults: FaultConfig | None = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_model_len <= 1:
            raise ValueError("max_model_len must be > 1")
        parse_mode(SpecMethod, self.speculative, "--speculative")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"--num-speculative-tokens must be in 1..16, got {self.num_speculative_tokens}")
        if self.prefill_chunk_target_ms < 0 or self.min_prefill_chunk <= 0:
            raise ValueError("--prefill-chunk-target-ms must be >= 0 and --min-prefill-chunk positive")
        parse_mode(KVDtype, self.kv_dtype, "--kv-dtype")
        parse_mode(Quantization, self.quantization, "--quantization")
        activations = parse_mode(Activations, self.quant_activations, "--quant-activations")
        if activations.bits and self.quantization == Quantization.NONE.value:
            raise ValueError(
                f"--quant-activations {activations.value} rounds what quantized weights multiply: add --quantization"
            )
