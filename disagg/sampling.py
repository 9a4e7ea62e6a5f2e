"""Per-request generation settings (`SamplingParams`, OpenAI names), validated on construction; they travel inside
`Request` (disagg/protocol.py re-exports them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


@dataclass
class SamplingParams:
    """Per-request generation settings (OpenAI names where they exist). Validated on construction."""

    max_tokens: int = field(default=16, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: the smallest set of this probability"})
    top_k: int = -1  # -1: disabled
    seed: int | None = field(default=None, metadata={"help": "per-request sampling seed (none: unseeded)"})
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the k most likely

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (
                isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens > 0,
                f"max_tokens must be a positive integer, got {self.max_tokens!r}",
            ),
            (
                _is_number(self.temperature) and self.temperature >= 0,
                f"temperature must be >= 0, got {self.temperature!r}",
            ),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (
                isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
                f"top_k must be -1 (disabled) or >= 1, got {self.top_k!r}",
            ),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
            (all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids must be integers"),
            (
                self.logprobs is None
                or (
                    isinstance(self.logprobs, int)
                    and not isinstance(self.logprobs, bool)
                    and 0 <= self.logprobs <= MAX_LOGPROBS
                ),
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown sampling parameters: {sorted(unknown)}")
        return cls(**data)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
