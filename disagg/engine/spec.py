"""Speculative decoding without a draft model: prompt-lookup (n-gram) proposals, verified in the decode step.

Lifecycle of one sequence's speculation (pure bookkeeping here; the engine and runner do the work):
1. Before a step, `Speculator.propose` looks up the longest recent n-gram (`ngram_max` down to `ngram_min` tokens)
   ending the sequence's tokens at an earlier place in its own history (prompt and output, so an agent's tool
   output, code or JSON that repeats is found) and proposes the tokens that followed it there.
2. The scheduler runs the last token plus the proposal in one forward (as a short prefill), so the model yields
   logits at every proposed position.
3. The runner verifies.  Greedy: proposals are accepted while they equal the model's own argmax; the first
   mismatch is replaced by the model's token, and if all match the model's next token comes as a bonus, so the
   output is token-for-token plain greedy decoding's.  Sampled: speculative (rejection) sampling
   (engine/sampler.py `verify_sampled`), so every token keeps the distribution plain sampling gives.  KV written
   for rejected positions lies past the sequence's computed count and is overwritten later.
4. `Speculator.record` updates the sequence's acceptance rate (an EWMA); the next proposal's length follows it,
   and below `min_acceptance` the sequence stops proposing for `cooldown_steps` steps (speculation that is not
   accepted costs compute and gains nothing), then probes again.

Requests that ask for logprobs do not speculate (their entries would have to be gathered per accepted token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.config import EngineConfig
from disagg.modes import SpecMethod


@dataclass(frozen=True)
class SpecConfig:
    method: SpecMethod = SpecMethod.NONE
    num_tokens: int = 4  # most tokens proposed per step
    ngram_max: int = 4
    ngram_min: int = 2
    # acceptance EWMA: the newest step weighs this much
    ewma_alpha: float = 0.3
    min_acceptance: float = 0.15  # below it the sequence pauses speculation
    cooldown_steps: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"--num-speculative-tokens must be in 1..16, got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max <= 16, got {self.ngram_min}..{self.ngram_max}")


def spec_config(engine: EngineConfig) -> SpecConfig:
    """The engine's speculation settings (--speculative, --num-speculative-tokens)."""
    try:
        method = SpecMethod(engine.speculative)
    except ValueError:
        raise ValueError(
            f"--speculative {engine.speculative!r} is not one of {[m.value for m in SpecMethod]}"
        ) from None
    return SpecConfig(method=method, num_tokens=engine.num_speculative_tokens)


@dataclass
class SpecState:
    """One sequence's speculation: its n-gram index over token_ids[:indexed] and its acceptance record."""

    index: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> position just after its last end
    indexed: int = 0
    acceptance: float = 1.0
    paused_for: int = 0
    proposed: int = 0
    accepted: int = 0


@dataclass
class SpecStats:
    steps: int = 0  # sequence-steps that carried a proposal
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    fallbacks: int = 0  # verifications abandoned for non-finite logits: the step decoded plainly


class Speculator:
    def __init__(self, config: SpecConfig) -> None:
        self.config = config
        self.stats = SpecStats()

    def _extend_index(self, state: SpecState, tokens: list[int]) -> None:
        """Index every n-gram that ends before the last token (the last one is what we look up)."""
        c = self.config
        end = len(tokens) - 1
        for stop in range(max(state.indexed, 1), end + 1):  # n-grams ending at tokens[stop - 1]
            for n in range(c.ngram_min, c.ngram_max + 1):
                if stop - n >= 0:
                    state.index[tuple(tokens[stop - n : stop])] = stop
        state.indexed = max(state.indexed, end + 1)

    def propose(self, state: SpecState, tokens: list[int], room: int) -> list[int]:
        """Up to min(room, a length set by the acceptance rate) tokens that followed the latest earlier
        occurrence of the longest n-gram ending `tokens`; [] when none is found or the sequence is paused."""
        c = self.config
        if state.paused_for > 0:
            state.paused_for -= 1
            return []
        k = min(room, max(1, round(c.num_tokens * state.acceptance)))
        if k <= 0 or len(tokens) < c.ngram_min + 1:
            return []
        if state.indexed > len(tokens):  # the sequence was cut back (preempted and resumed): rebuild
            state.index.clear()
            state.indexed = 0
        self._extend_index(state, tokens)
        for n in range(min(c.ngram_max, len(tokens) - 1), c.ngram_min - 1, -1):
            after = state.index.get(tuple(tokens[-n:]))
            if after is not None and after < len(tokens):
                return tokens[after : after + k]
        return []

    def record(self, state: SpecState, proposed: int, accepted: int) -> None:
        c = self.config
        state.proposed += proposed
        state.accepted += accepted
        self.stats.steps += 1
        self.stats.proposed_tokens += proposed
        self.stats.accepted_tokens += accepted
        rate = accepted / proposed
        state.acceptance = (1 - c.ewma_alpha) * state.acceptance + c.ewma_alpha * rate
        if state.acceptance < c.min_acceptance:
            state.paused_for = c.cooldown_steps
            state.acceptance = c.min_acceptance * 2  # probe with a short proposal after the pause


@dataclass(frozen=True)
class Verified:
    """How one row's proposal fared in a step: proposals accepted, or abandoned for non-finite logits."""

    accepted: int
    fell_back: bool


def verify_greedy(draft: list[int], targets: list[int]) -> tuple[int, int]:
    """(accepted proposals, the token after them): `targets` are the model's argmax at the last token and at
    each proposed position (len(draft) + 1 of them)."""
    accepted = 0
    while accepted < len(draft) and draft[accepted] == targets[accepted]:
        accepted += 1
    return accepted, targets[accepted]
