"""Proposals checked against a step's logits (speculative decoding, engine/spec.py proposes): the runner's step
computes one row of logits per sampled request plus one per proposed token, and this decides, per request, how
many proposals stand and the token after them.

Greedy requests keep proposals while they equal the greedy token at their position (`verify_greedy`); sampled
ones draw each position as plain sampling would (`verify_sampled`).  A request whose rows are not all finite falls
back: it is decoded plainly from its last token's logits, and counted.
"""

from __future__ import annotations

import torch

from disagg.engine.batch import ScheduledBatch
from disagg.engine.sampler import sampling_probs, token_generator, verify_sampled
from disagg.engine.sequence import Sequence
from disagg.engine.spec import Verified, verify_greedy


def _verify_row(seq: Sequence, draft: list[int], logits: torch.Tensor, greedy: list[int]) -> tuple[int, int]:
    sp = seq.sampling
    if sp.greedy:
        return verify_greedy(draft, greedy)
    probs = sampling_probs(logits, [sp] * len(logits)).cpu()
    first = seq.num_tokens - seq.num_prompt_tokens  # the output index of the first token this step emits
    return verify_sampled(draft, probs, [token_generator(sp, first + i) for i in range(len(logits))])


def verify_proposals(
    batch: ScheduledBatch,
    rows: list[int],
    logits: torch.Tensor,
    scanned: tuple[list[int], list[bool]],
    out: dict[int, int],
    verified: dict[int, Verified],
) -> tuple[list[int], list[int]]:
    """Verification of the batch rows `rows` that carry a proposal, from their logits and their scan (a
    LogitScan's: greedy token and finiteness per logits row): tokens into `out`, outcomes into `verified`.  Returns
    the logits rows and the batch rows left to sample plainly: one per request without a proposal, or whose
    proposal's logits are not finite (a fallback)."""
    greedy, finite = scanned
    keep: list[int] = []
    plain: list[int] = []
    offset = 0
    for r in rows:
        draft = batch.drafts[r]
        width = 1 + len(draft)
        if draft and all(finite[offset : offset + width]):
            chunk = logits[offset : offset + width]
            accepted, token = _verify_row(batch.seqs[r], draft, chunk, greedy[offset : offset + width])
            verified[r] = Verified(accepted, fell_back=False)
            out[r] = token
        else:
            if draft:
                verified[r] = Verified(0, fell_back=True)
            keep.append(offset)
            plain.append(r)
        offset += width
    return keep, plain
