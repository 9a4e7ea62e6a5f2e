"""Step-time model of an engine: how long one scheduler step takes, from what the step computes.

    t(step) = base + per_token * new_tokens + per_seq * seqs + per_attn * sum_i(new_i * context_i) / 1000

new_tokens is the step's token count (prefill chunks + one per decode), seqs the batch size, and the attention
term counts query x key pairs (in thousands).  A KV transfer between workers costs
transfer_latency + bytes / transfer_bandwidth.  Fitted by least squares with non-negative coefficients.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from disagg.engine.batch import ScheduledBatch
from disagg.engine.step_time import nnls

FEATURES = ("base", "per_token", "per_seq", "per_attn")


def batch_features(batch: ScheduledBatch) -> list[float]:
    """[1, new tokens, seqs, query x key pairs / 1000] of a scheduled batch (before it runs)."""
    return [1.0, float(batch.total_tokens), float(len(batch.seqs)), batch.attention_kpairs()]


@dataclass
class StepTimeModel:
    base: float = 0.02
    per_token: float = 0.004
    per_seq: float = 0.0005
    per_attn: float = 0.0
    transfer_latency: float = 0.002
    transfer_bandwidth: float = 5e9  # bytes/s
    bytes_per_block: int = 737_280  # SmolLM2-135M, fp32, 16-token blocks
    cpu_load_s_per_block: float = 55e-6  # TieredStore CPU -> device, per block (bench/offload.py: 13.4 GB/s)
    disk_load_s_per_block: float = 97e-6  # TieredStore disk -> device, per block (7.6 GB/s, page-cached)
    source: str = "default guess"

    def predict(self, features: list[float]) -> float:
        return float(np.dot(features, [self.base, self.per_token, self.per_seq, self.per_attn]))

    def step_time(self, batch: ScheduledBatch) -> float:
        return self.predict(batch_features(batch))

    def transfer_time(self, num_blocks: int) -> float:
        return (
            self.transfer_latency + num_blocks * self.bytes_per_block / self.transfer_bandwidth if num_blocks else 0.0
        )

    @classmethod
    def fit(cls, features: list[list[float]], seconds: list[float], **extra: Any) -> StepTimeModel:
        coef = nnls(np.asarray(features, dtype=float), np.asarray(seconds, dtype=float))
        base, per_token, per_seq, per_attn = (float(c) for c in coef)
        return cls(base=base, per_token=per_token, per_seq=per_seq, per_attn=per_attn, **extra)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        return cls(**json.loads(Path(path).read_text()))
