"""Silent failures, both ways: injecting them (chaos drills and tests) and catching the ones a step can see.

Injection (`FaultConfig` in disagg/config.py, set as `EngineConfig.faults`; None, the default, injects nothing):
a worker that answers fast but wrong (one decoder layer's weights scaled at load: finite, plausible, wrong tokens),
NaN logits (every N steps, or from step K on), or a slow one (each model step stretched by a factor: a gray
failure).  Like vLLM's fault injection it is a product feature so that drills run on the real serving path;
nothing turns it on unless a config asks for it.

Detection (`output_fault`): a sampled row whose logits were not all finite comes out of the runner as
`NONFINITE_TOKEN` (the runner's LogitScan checks the sampled rows only, in the pass that finds their greedy tokens), and
a token id outside the vocabulary is impossible; either fails the request (the worker raises `OutputCorrupt`, so
the router retries it elsewhere) and the worker reports itself unhealthy (cluster/worker.py).  A model that is
wrong but finite is the canary's to catch (router/canary.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from disagg.config import FaultConfig

NONFINITE_TOKEN = -1  # what the runner samples for a row whose logits hold NaN or Inf (never a real token id)


class FaultInjector:
    """Applies a FaultConfig to one runner's model, logits and step time."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.steps = 0  # model steps seen (the runner calls `logits` once per step)
        self.injected_nan = 0

    def corrupt(self, layers: nn.ModuleList) -> None:
        """Scale every parameter of the chosen layer (before any pre-packing of the weights)."""
        k = self.config.corrupt_layer
        if k < 0:
            return
        if k >= len(layers):
            raise ValueError(f"corrupt_layer={k} but the model has {len(layers)} layers")
        with torch.no_grad():
            for param in layers[k].parameters():
                param.mul_(self.config.corrupt_scale)

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        c = self.config
        every = c.nan_every and self.steps % c.nan_every == 0
        if every or (c.nan_from_step >= 0 and self.steps >= c.nan_from_step):
            self.injected_nan += 1
            return torch.full_like(logits, float("nan"))
        return logits

    def stretch(self, elapsed_s: float) -> None:
        """Sleep so that a step that took `elapsed_s` takes slow_factor times as long."""
        if self.config.slow_factor > 1.0:
            time.sleep(elapsed_s * (self.config.slow_factor - 1.0))


def output_fault(token: int, vocab_size: int) -> str | None:
    """Why a sampled token cannot be served (None: it can)."""
    if token == NONFINITE_TOKEN:
        return "non-finite logits (NaN or Inf)"
    if not 0 <= token < vocab_size:
        return f"token id {token} outside the vocabulary [0, {vocab_size})"
    return None


@dataclass(frozen=True)
class OutputFault:
    """A request the engine failed because its step produced something impossible."""

    request_id: str
    reason: str
