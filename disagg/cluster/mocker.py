"""The mocker: an engine worker whose model is the simulator's (sim/runner.py SimRunner) - real scheduler, block
pool, prefix cache, KV events, heartbeats and streams, but no weights and no KV memory - chosen like any engine
(`WorkerConfig.mock`, `disagg serve --mock`).  As Dynamo's mocker, it serves two jobs:

  - load on everything but the model: routers, replicas, admission and the HTTP path measured without the model's
    cost (`time_scale` 0: a step takes no time) - bench/router_replicas.py;
  - a cluster larger than the machine: steps last what the step-time model says (`time_scale` 1, or slower or
    faster), spent sleeping, so many mock workers share a few cores.

Tokens are deterministic per request and position (not the model's), streamed as text through the directory's
tokenizer when it has one; EOS is never sampled, so every request runs to its max_tokens.  A mock worker's KV memory
is one float per block (TokenKV): it wires up, leases and reads blocks like a real worker, but the bytes mean
nothing; it has no CPU or disk tier (ClusterConfig.mock turns them off).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from disagg.cluster.worker_config import MockConfig
from disagg.config import EngineConfig
from disagg.engine.batch import ScheduledBatch
from disagg.engine.engine import LLMEngine
from disagg.engine.kv_format import KVFormat
from disagg.engine.tokenizer import Tokenizer
from disagg.modes import KVDtype
from disagg.sim.runner import SimRunner, sim_model_config
from disagg.sim.timemodel import StepTimeModel

DEFAULT_VOCAB = 49152  # SmolLM2's, when the model directory does not say


class TokenKV:
    """A stand-in KV cache of one float per block: what a worker registers with NIXL and sends as its layout, so
    mock workers wire up, and read blocks from each other, as real ones do (the bytes mean nothing)."""

    def __init__(self, num_blocks: int) -> None:
        self.tensor = torch.zeros(num_blocks, 1, 1)
        self.format = KVFormat(KVDtype.AUTO, 1, self.tensor.dtype)


class PacedRunner(SimRunner):
    """A SimRunner that spends each step's modelled time (x `time_scale`) sleeping on the engine's thread."""

    def __init__(self, model: StepTimeModel, vocab_size: int, max_len: int, config: MockConfig) -> None:
        super().__init__(model, sim_model_config(vocab_size, max_len), config.num_blocks)
        self.time_scale = config.time_scale
        self.kv_cache = TokenKV(config.num_blocks)  # type: ignore[assignment]  # the simulator's runner has none

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        out = super().execute(batch)
        if self.time_scale > 0:  # a real process on its own clock: the modelled time alone, as a real step's
            time.sleep(self.last_work_s * self.time_scale)
        return out


def mock_engine(engine: EngineConfig, mock: MockConfig) -> LLMEngine:
    """An engine over a PacedRunner, sized by the model directory's vocabulary and context (nothing else is read)."""
    model = StepTimeModel.load(mock.time_model) if mock.time_model else StepTimeModel()
    hf = json.loads((Path(engine.model) / "config.json").read_text()) if engine.model else {}
    vocab = int(hf.get("vocab_size", DEFAULT_VOCAB))
    max_len = min(engine.max_model_len, int(hf.get("max_position_embeddings", engine.max_model_len)))
    # the directory's tokenizer, when it has one, so streams carry text as a real worker's do (clients time their
    # first token by it); the mock's tokens are never its EOS (sim/runner.py samples ids from 256 up)
    has_tokenizer = engine.model and (Path(engine.model) / "tokenizer.json").is_file()
    tokenizer = Tokenizer.from_dir(engine.model) if has_tokenizer else None
    return LLMEngine(engine, PacedRunner(model, vocab, max_len, mock), tokenizer)
