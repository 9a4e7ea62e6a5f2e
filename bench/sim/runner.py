"""The model stand-in for a simulated engine: samples deterministic tokens and prices each step."""
from __future__ import annotations

import zlib

from disagg.engine.model import ModelConfig
from disagg.engine.scheduler import ScheduledBatch

from bench.sim.timemodel import StepTimeModel


class SimRunner:
    """Duck-types ModelRunner.execute; `last_step_s` is the modelled duration of the step just executed."""

    def __init__(self, model: StepTimeModel, vocab_size: int) -> None:
        self.model, self.vocab_size = model, vocab_size
        self.last_step_s = 0.0

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        self.last_step_s = self.model.step_time(batch)
        out = {}
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.num_computed_tokens + n == seq.num_tokens:  # the row completes its known tokens: it samples
                # distinct per request and position, so generated blocks hash apart like real outputs
                out[row] = 256 + zlib.crc32(f"{seq.request_id}:{seq.num_tokens}".encode()) % (self.vocab_size - 256)
        return out


def sim_model_config(vocab_size: int = 49152, max_len: int = 8192) -> ModelConfig:
    """Only vocab, context and EOS matter to the engine's bookkeeping; the shape is SmolLM2-135M's."""
    return ModelConfig(model_type="llama", vocab_size=vocab_size, hidden_size=576, intermediate_size=1536,
                       num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=max_len, tie_word_embeddings=True,
                       attention_bias=False, eos_token_ids=[])
