"""This engine's own step-time model, fitted online, and the prefill chunk it lets into a step that carries
decodes (TPOT-sized chunked prefill).

    t(step) = base + per_token * new_tokens + per_seq * seqs + per_attn * sum_i(new_i * context_i) / 1000

(the form of the simulator's `StepTimeModel`, disagg/sim/timemodel.py).  `StepFit` keeps the last `window` model
steps and refits every `refit_every` steps by non-negative least squares, once the window holds steps of
different token counts with prompt tokens among them (prefill steps beside decode-only ones, or prefill chunks of
different sizes): otherwise the per-token and fixed costs cannot be told apart, and the model stays cold.

`ChunkSizer` answers the scheduler's question: with these decode rows in the step, how many prompt tokens fit
before the step's predicted time passes the target (the TPOT the operator asks for)?  A fixed chunk makes every
decode step that carries one as long as that chunk takes, whatever the TPOT SLO says; a chunk sized from the model
keeps the decodes' TPOT under the target and lets the prompt through in more, smaller steps.
Cold (no fit yet) or with no decode in the step, the budget is the configured fixed one, as before; the answer
is never below `min_chunk`, so a prompt always progresses.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 (few columns: drop the most negative coefficient and refit until none is)."""
    active = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        if active:
            sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
            x[active] = sol
        negative = [i for i in active if x[i] < 0]
        if not negative:
            return x
        active.remove(min(negative, key=lambda i: x[i]))


@dataclass(frozen=True)
class StepCoefficients:
    base: float
    per_token: float
    per_seq: float
    per_attn: float

    def predict(self, tokens: float, seqs: float, kpairs: float) -> float:
        return self.base + self.per_token * tokens + self.per_seq * seqs + self.per_attn * kpairs


class StepFit:
    """Online fit of the step-time model from the engine's measured steps."""

    def __init__(self, window: int, refit_every: int, prefill_tokens: int) -> None:
        self.window, self.refit_every = window, refit_every
        self.prefill_tokens = prefill_tokens  # a step with this many tokens beyond one per row counts as a prefill
        self._rows: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self._since = 0
        self.model: StepCoefficients | None = None  # None: cold

    def add(self, tokens: int, seqs: int, kpairs: float, seconds: float) -> None:
        if not (seconds > 0 and math.isfinite(seconds)) or tokens <= 0:
            return
        self._rows.append((float(tokens), float(seqs), kpairs, seconds))
        self._since += 1
        if self._since >= self.refit_every or self.model is None:
            self._since = 0
            self._refit()

    def _refit(self) -> None:
        rows = np.asarray(self._rows, dtype=float)
        if len(rows) < self.refit_every:
            return
        prefill = rows[:, 0] - rows[:, 1] >= self.prefill_tokens  # a block's worth of prompt beyond a token a row
        tokens = rows[prefill, 0]
        # the per-token cost needs steps of different token counts with prompt tokens among them: decode-only steps
        # beside prefill ones, or prefill steps of different sizes (a prefill-only worker never decodes)
        if len(tokens) < 2 or ((~prefill).sum() < 2 and tokens.max() < 1.5 * tokens.min()):
            return
        a = np.column_stack([np.ones(len(rows)), rows[:, 0], rows[:, 1], rows[:, 2]])
        base, per_token, per_seq, per_attn = (float(c) for c in nnls(a, rows[:, 3]))
        if per_token > 0:
            self.model = StepCoefficients(base, per_token, per_seq, per_attn)


@dataclass(frozen=True)
class ChunkRule:
    """How an engine sizes the prompt chunk of a step that carries decodes (the router prices a worker's prefill
    with the same rule, from the worker's heartbeat)."""

    target_s: float  # 0: no target, every step takes up to max_tokens
    max_tokens: int
    min_chunk: int
    block_size: int

    def tokens(self, m: StepCoefficients, decode_tokens: int, decode_seqs: int, kpairs: float, context: int) -> int:
        if self.target_s <= 0 or decode_seqs == 0:
            return self.max_tokens
        # the step with the decodes alone, plus the one sequence the chunk belongs to; then n prompt tokens cost
        # per_token * n + per_attn * n * (context + n) / 1000: the largest n within the slack
        slack = self.target_s - m.predict(decode_tokens, decode_seqs + 1, kpairs)
        a, b = m.per_attn / 1000, m.per_token + m.per_attn * context / 1000
        if slack <= 0:
            n = 0
        elif a > 0:
            n = int((-b + math.sqrt(b * b + 4 * a * slack)) / (2 * a))
        else:
            n = int(slack / b)
        n -= n % self.block_size  # whole blocks: each chunk's last block registers in the prefix cache at once
        return max(self.min_chunk, min(n, self.max_tokens))

    def prefill_seconds(
        self,
        m: StepCoefficients,
        tokens: int,
        decode_seqs: int,
        decode_context: int,
        prompt: int | None = None,
        decode_steps: float | None = None,
        cached: int = 0,
    ) -> float:
        """How long computing `tokens` prompt tokens (a queue of prompts about `prompt` tokens long; default: one
        prompt) takes beside `decode_seqs` decoding sequences holding `decode_context` tokens, which finish after
        `decode_steps` more steps (None: they outlast the prompt): whole steps of the chunk this rule allows beside
        them, then full chunks, plus the prompts' own attention (each quadratic in its length, as the engine counts
        it chunk by chunk) and this prompt's attention over its `cached` prefix.  The model is linear in a step's
        tokens, so `steps` steps carrying n prompt tokens in all cost the steps without them plus n tokens: a step
        carries the tokens left, not a whole chunk (15 uncached tokens on an idle worker were priced as a 512-token
        step: 1.34 s for a 95 ms first token)."""
        if tokens <= 0:
            return 0.0
        kpairs = decode_context / 1000
        chunk = self.tokens(m, decode_seqs, decode_seqs, kpairs, cached)  # (the engine's context grows past it)
        steps = math.ceil(tokens / chunk)
        if decode_seqs and decode_steps is not None:
            steps = min(steps, max(0, math.floor(decode_steps)))
        beside = min(tokens, steps * chunk)  # computed beside the decodes
        seconds = steps * m.predict(decode_seqs, decode_seqs + 1, kpairs) + m.per_token * beside
        rest = tokens - beside
        if rest > 0:  # the decodes are done: the rest in full chunks
            seconds += math.ceil(rest / self.max_tokens) * m.predict(0, 1, 0.0) + m.per_token * rest
        # the engine counts a chunk of n after c computed tokens as n x (c + n) key pairs: over a prompt of `own`
        # tokens in chunks of `size`, own x cached + own^2 / 2 + own x size / 2 (exact for equal chunks)
        own = min(tokens, prompt or tokens)
        size = min(own, chunk if beside else self.max_tokens)
        return seconds + m.per_attn * (tokens * (own + size) / 2 + own * cached) / 1000


class ChunkSizer:
    """The prompt tokens a step may carry beside its decode rows, so that it stays within the rule's target."""

    def __init__(self, fit: StepFit, rule: ChunkRule) -> None:
        self.fit, self.rule = fit, rule
        self.last_budget: int | None = None  # the last budget given with decodes in the step (None: none yet)

    def prefill_budget(self, decode_tokens: int, decode_seqs: int, decode_kpairs: float, context: int = 0) -> int:
        """`context`: tokens the chunk's sequence has computed already (its attention reads them)."""
        m = self.fit.model
        if m is None or decode_seqs == 0:
            return self.rule.max_tokens
        self.last_budget = budget = self.rule.tokens(m, decode_tokens, decode_seqs, decode_kpairs, context)
        return budget
