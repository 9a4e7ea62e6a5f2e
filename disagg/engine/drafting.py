"""The engine's side of speculative decoding (engine/spec.py has the proposer and the verification rule).

Before a step, `propose_drafts` gives each eligible running sequence a proposal (no logprobs asked, decoding
its next token, room left under max_tokens and max_model_len).  After the runner verified them,
`apply_verified` records each row's outcome, sets the row's computed count to the last token plus the accepted
proposals (the KV of rejected ones is past it, and is overwritten later), and returns the accepted tokens the
engine emits before the runner's own token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from disagg.engine.batch import ScheduledBatch
from disagg.engine.sequence import Sequence
from disagg.engine.spec import SpecState, Speculator, Verified


def _eligible(seq: Sequence) -> bool:
    sp = seq.sampling
    decoding = seq.num_computed_tokens == seq.num_tokens - 1 and seq.num_tokens > seq.num_prompt_tokens
    # a prompt with images holds placeholder ids above the vocabulary, which neither a drafter's n-grams nor its
    # draft model may propose or embed: such requests decode without speculation
    return decoding and sp.logprobs is None and not seq.pending_first_token and not seq.images


def propose_drafts(speculator: Speculator, running: Iterable[Sequence], max_model_len: int) -> None:
    for seq in running:
        if not _eligible(seq):
            continue
        # the step emits the accepted proposals and one more token: stay within max_tokens and the context
        room = min(seq.sampling.max_tokens - len(seq.output_token_ids), max_model_len - seq.num_tokens) - 1
        if room <= 0:
            continue
        if seq.spec is None:
            seq.spec = SpecState()
        seq.draft = speculator.propose(seq.spec, seq.token_ids, room)


def apply_verified(
    speculator: Speculator, batch: ScheduledBatch, verified: Mapping[int, Verified]
) -> dict[int, list[int]]:
    """{row: accepted proposed tokens} for the rows that carried a proposal; counts and rates recorded."""
    accepted: dict[int, list[int]] = {}
    for row, outcome in verified.items():
        draft = batch.drafts[row]
        seq = batch.seqs[row]
        assert seq.spec is not None
        if outcome.fell_back:
            speculator.stats.fallbacks += 1
        speculator.record(seq.spec, len(draft), outcome.accepted)
        batch.num_new_tokens[row] = 1 + outcome.accepted  # the last token and the accepted proposals
        accepted[row] = draft[: outcome.accepted]
    return accepted
