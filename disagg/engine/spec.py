"""Speculative decoding without a draft model: prompt-lookup (n-gram) proposals, verified in the decode step.

Lifecycle of one sequence's speculation (pure bookkeeping here; the engine and runner do the work):
1. Before a step, `Speculator.propose` looks up the longest recent n-gram (`ngram_max` down to `ngram_min` tokens)
   ending the sequence's tokens at an earlier place in its own history (prompt and output, so an agent's tool
   output, code or JSON that repeats is found) and proposes the tokens that followed it there.
2. The scheduler runs the last token plus the proposal in one forward (as a short prefill), so the model yields
   logits at every proposed position.
3. The runner verifies. Greedy: proposals are accepted while they equal the model's own argmax; the first mismatch
   is replaced by the model's token, and if all match the model's next token comes as a bonus, so the output is
   token-for-token plain greedy decoding's. Sampled (engine/sampler.py `verify_sampled`): each position's token is
   drawn as plain sampling draws it and proposals are kept while they equal it, which is speculative sampling for a
   proposer with one candidate; a seeded request's tokens follow its logits alone, not how many were proposed (see
   verify_sampled for the float caveat). KV written for rejected positions lies past the sequence's computed count
   and is overwritten later.
4. `Speculator.record` updates the sequence's per-position acceptance rates: c_j, the chance the j-th proposed
   token is accepted once the ones before it were (an EWMA over the steps whose proposal reached position j).  A
   sequence copying text accepts long runs (c_2.. near 1 even where c_1 is not); chat text rarely gets past c_1.
5. Between 1 and 2, the engine's drafting (drafting.py) cuts every proposal to the batch-wide length that
   maximizes expected tokens per second at the measured step times (spec_budget.py).  A sequence's first proposal,
   and one that comes after its proposals were cut to nothing for `cooldown_steps` steps in a row, is a probe: its
   first token is planned as if accepted at least `probe_chance` of the time, so where rows are cheap it is
   verified, and the sequence's rates (which start from the engine's record) follow its own text, also text that
   starts repeating later (an agent's tool output, a file being rewritten).  Where rows cost what tokens do,
   nothing is verified, probes included.

Requests that ask for logprobs do not speculate (their entries would have to be gathered per accepted token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.config import EngineConfig
from disagg.engine.spec_budget import DecodeStepTimes, chances
from disagg.modes import SpecMethod


@dataclass(frozen=True)
class SpecConfig:
    method: SpecMethod = SpecMethod.NONE
    num_tokens: int = 4  # most tokens proposed per step
    ngram_max: int = 4
    ngram_min: int = 2
    # per-position acceptance EWMA: the newest step weighs this much
    ewma_alpha: float = 0.3
    # before two decode step sizes are measured (spec_budget.py is cold), a token is proposed while its chance is
    # at least this
    min_acceptance: float = 0.15
    cooldown_steps: int = 16  # steps a sequence's proposals may be cut to nothing before one is probed
    probe_chance: float = 0.5  # a probe's first token is planned as if accepted this often (at least)
    step_time_alpha: float = 0.2  # the decode step time EWMA (per row count) the budget reads
    # one plan in this many verifies every proposal: the row counts the budget stopped choosing are measured again
    # (a first slow sample, or one from shorter contexts, would otherwise decide them for good)
    explore_every: int = 64
    initial_rate: float = 1.0  # the engine's record before any verification: proposals are tried

    def __post_init__(self) -> None:
        if not 1 <= self.num_tokens <= 16:
            raise ValueError(f"--num-speculative-tokens must be in 1..16, got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max <= 16, got {self.ngram_min}..{self.ngram_max}")
        for name in ("ewma_alpha", "probe_chance", "step_time_alpha", "initial_rate"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"speculation's {name} must be in (0, 1], got {getattr(self, name)}")
        if self.explore_every < 1:
            raise ValueError(f"speculation's explore_every must be at least 1, got {self.explore_every}")


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
    # rates[j]: the chance the (j+1)-th proposed token is accepted once the j before it were (an EWMA from the
    # engine's record at the sequence's first proposal)
    rates: list[float] = field(default_factory=list)
    tries: list[int] = field(default_factory=list)  # verifications that reached each position
    idle: int = 0  # steps in a row its proposal was cut to nothing
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
        self.times = DecodeStepTimes(config.step_time_alpha)  # what the budget reads; the engine measures
        self.plans = 0  # budget plans made (every explore_every-th verifies every proposal)
        # every sequence's verifications folded into one record: a new sequence's rates start from it, so a new
        # request to an engine serving chat starts expecting little, one to an engine editing code expecting much
        self.rates = [config.initial_rate] * config.num_tokens

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
        """Up to min(room, num_tokens) tokens that followed the latest earlier occurrence of the longest n-gram
        ending `tokens`; [] when none is found.  How many of them a step verifies is the budget's call."""
        c = self.config
        k = min(room, c.num_tokens)
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

    def chances(self, state: SpecState, k: int) -> list[float]:
        """The chances that the 1st..k-th proposed tokens are accepted, from the sequence's rates."""
        if len(state.rates) < k:
            state.rates.extend(self.rates[len(state.rates) : k])
            state.tries.extend([0] * (k - len(state.tries)))
        return chances(state.rates[:k])

    def record(self, state: SpecState, proposed: int, accepted: int) -> None:
        """A verified proposal: positions up to the first refused one were tried, those before it accepted."""
        c = self.config
        state.proposed += proposed
        state.accepted += accepted
        self.stats.steps += 1
        self.stats.proposed_tokens += proposed
        self.stats.accepted_tokens += accepted
        self.chances(state, proposed)  # rates for every position tried
        for j in range(min(accepted + 1, proposed)):
            hit = 1.0 if j < accepted else 0.0
            state.tries[j] += 1
            # the engine's record weighs as one verification: a sequence's own first ones soon outweigh it (a
            # code edit after a run of chat copies from its first proposals on), then the EWMA follows it
            alpha = max(c.ewma_alpha, 1 / (1 + state.tries[j]))
            state.rates[j] = (1 - alpha) * state.rates[j] + alpha * hit
            self.rates[j] = (1 - c.ewma_alpha) * self.rates[j] + c.ewma_alpha * hit


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
