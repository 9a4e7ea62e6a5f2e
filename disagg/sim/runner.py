"""The model stand-in for a simulated engine (a `Runner`, disagg/engine/runner.py): samples deterministic tokens
and prices each step with the step-time model (`last_work_s`: the step alone on a core); it holds no KV memory.
The engine measures its speeds from its steps' times, as a real engine does from its contended steps, so the
router sees the speeds a real router would: `last_step_s` is the step's time where it is known at once, and None
on shared cores, where the cluster runs the step's work as processor sharing (sim/cores.py `SharedSteps`) and the
worker hands the engine the step's time when it ends (`LLMEngine.measure`)."""

from __future__ import annotations

import zlib

import torch

from disagg.engine.batch import ScheduledBatch
from disagg.engine.model import ModelConfig
from disagg.engine.spec import Verified
from disagg.model_store import DEFAULT_VOCAB_SIZE
from disagg.protocol import LoRARef
from disagg.sim.timemodel import StepTimeModel


class SimRunner:
    """A Runner whose `last_step_s` is the modelled duration of the step just executed (virtual time)."""

    device = torch.device("cpu")
    dtype = torch.float32
    kv_cache = None  # block ids are bookkeeping only: no KV tensor to read or copy

    def __init__(self, model: StepTimeModel, model_config: ModelConfig, num_blocks: int) -> None:
        self.model, self.model_config, self.num_blocks = model, model_config, num_blocks
        self.vocab_size = model_config.vocab_size
        self.last_tokens = 0  # the last step's tokens (its co-run class)
        self.last_work_s = 0.0  # the last step alone on a core (times the cluster's step_slowdown)
        self.last_step_s: float | None = 0.0  # the step's time: its work, or None on shared cores (known at its end)
        self.shared_cores = False  # set by the cluster: a step's time is then known only when it ends
        self.step_slowdown = 1.0  # a constant factor on every step (SimClusterConfig.step_slowdown)
        self.last_logprobs: dict[int, list] = {}  # simulated requests ask for no logprobs
        self.last_verified: dict[int, Verified] = {}  # simulated engines do not speculate

    def load_lora(self, ref: LoRARef) -> None:
        """A stand-in has no weights: an adapter costs nothing to load and changes no modelled time."""

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        self.last_tokens = batch.total_tokens
        self.last_work_s = self.model.step_time(batch) * self.step_slowdown
        self.last_step_s = None if self.shared_cores else self.last_work_s  # (a core of its own: no contention)
        out = {}
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.num_computed_tokens + n == seq.num_tokens:  # the row completes its known tokens: it samples
                # distinct per request and position, so generated blocks hash apart like real outputs
                out[row] = 256 + zlib.crc32(f"{seq.request_id}:{seq.num_tokens}".encode()) % (self.vocab_size - 256)
        return out


def sim_model_config(vocab_size: int = DEFAULT_VOCAB_SIZE, max_len: int = 8192) -> ModelConfig:
    """Only vocab, context and EOS matter to the engine's bookkeeping; the shape is SmolLM2-135M's."""
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        attention_bias=False,
        eos_token_ids=[],
    )
