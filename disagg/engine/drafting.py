"""The engine's side of speculative decoding (engine/spec.py has the proposer and the verification rule).

Before a step, `propose_drafts` gives each eligible running sequence a proposal (no logprobs asked, decoding
its next token, room left under max_tokens and max_model_len), cut to the batch-wide budget (spec_budget.py).
After the runner verified them, `apply_verified` records each row's outcome, sets the row's computed count to
the last token plus the accepted proposals (the KV of rejected ones is past it, and is overwritten later), and
returns the accepted tokens the engine emits before the runner's own token.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Sequence_

from disagg.engine.batch import ScheduledBatch
from disagg.engine.sequence import Sequence
from disagg.engine.spec import SpecState, Speculator, Verified
from disagg.engine.spec_budget import plan_lengths


def _eligible(seq: Sequence) -> bool:
    sp = seq.sampling
    decoding = seq.num_computed_tokens == seq.num_tokens - 1 and seq.num_tokens > seq.num_prompt_tokens
    # a prompt with images holds placeholder ids above the vocabulary, which neither a drafter's n-grams nor its
    # draft model may propose or embed: such requests decode without speculation
    return decoding and sp.logprobs is None and not seq.pending_first_token and not seq.images


def propose_drafts(speculator: Speculator, running: Sequence_[Sequence], max_model_len: int) -> None:
    found: list[tuple[Sequence, SpecState, list[int]]] = []
    for seq in running:
        seq.draft = []  # a proposal is for one step (a sequence preempted before the scheduler took it kept its own)
        if not _eligible(seq):
            continue
        # the step emits the accepted proposals and one more token: stay within max_tokens and the context
        room = min(seq.sampling.max_tokens - len(seq.output_token_ids), max_model_len - seq.num_tokens) - 1
        if room <= 0:
            continue
        state = seq.spec = seq.spec or SpecState()
        if proposal := speculator.propose(state, seq.token_ids, room):
            found.append((seq, state, proposal))
    if not found:
        return
    c = speculator.config
    cands = [speculator.chances(state, len(proposal)) for _, state, proposal in found]
    for cand, (_, state, _) in zip(cands, found):
        if state.proposed == 0 or state.idle >= c.cooldown_steps:  # a probe: worth a row where rows are cheap
            cand[0] = max(cand[0], c.probe_chance)
    speculator.plans += 1
    if _explores(speculator.plans, c.explore_every):
        lengths = [len(proposal) for _, _, proposal in found]  # measure the row counts the plans stopped choosing
    else:
        # the step's rows before proposals: its decoding sequences (a step that carries a prompt chunk is planned as
        # if it did not: its proposals' rows cost at least what they cost in a decode-only step)
        rows = sum(1 for seq in running if seq.num_computed_tokens == seq.num_tokens - 1)
        lengths = plan_lengths(cands, max(rows, 1), speculator.times, c.min_acceptance)
    for (seq, state, proposal), k in zip(found, lengths):
        state.idle = 0 if k else state.idle + 1
        seq.draft = proposal[:k]


def _explores(plan: int, every: int) -> bool:
    """Plans 1, 2, 4, 8 ... below `every`, then every `every`-th: a young table is re-measured soon (its first
    samples are the least reliable), an old one now and then."""
    return plan % every == 0 or (plan < every and plan & (plan - 1) == 0)


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


def decode_only(batch: ScheduledBatch) -> bool:
    """Every row of the step decodes one token (with or without a proposal): no prompt chunk rides along, so
    its time says what verifying proposals costs (the budget's table)."""
    return all(
        n == 1 + len(draft) and seq.num_tokens > seq.num_prompt_tokens
        for seq, n, draft in zip(batch.seqs, batch.num_new_tokens, batch.drafts)
    )
