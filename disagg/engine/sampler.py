"""Greedy / temperature / top-k / top-p sampling with per-request seeds.

A seeded request draws each token from a generator seeded by (seed, output index), so its output does not
depend on what else is in the batch or on preemption and recompute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import torch

from disagg.protocol import SamplingParams

if TYPE_CHECKING:
    from disagg_kernels.cpu_quant import NativeKernels

# per row of a step's logits [B, V]: the index of its first maximum (its greedy token) and whether all its values
# are finite
LogitScan: TypeAlias = Callable[[torch.Tensor], tuple[list[int], list[bool]]]

_MASK64 = (1 << 63) - 1


def _token_seed(seed: int, index: int) -> int:
    return (seed * 6364136223846793005 + index * 1442695040888963407 + 1) & _MASK64


def scan_logits(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """The LogitScan in torch (any device, any dtype): two passes over the logits."""
    return logits.argmax(dim=-1).tolist(), torch.isfinite(logits).all(dim=-1).tolist()


def logit_scan(native: NativeKernels | None) -> LogitScan:
    """The runner's LogitScan: with the CPU's compiled kernels, one native pass over float32 CPU logits
    (cpu_logits.cpp: torch's two passes cost ~150 us a row of the default model's 49,152), else `scan_logits`."""
    if native is None:
        return scan_logits

    def scan(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
        if logits.dtype != torch.float32 or logits.device.type != "cpu":
            return scan_logits(logits)
        return native.scan_logits(logits)

    return scan


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_indices: list[int],
    generator: torch.Generator | None = None,
    greedy: list[int] | None = None,
) -> list[int]:
    """One token per row of `logits` [B, V]; `output_indices[i]` is how many tokens row i has generated so far;
    `greedy`: the rows' argmax where the caller has it (a LogitScan's)."""
    tokens = list(greedy) if greedy is not None else logits.argmax(dim=-1).tolist()
    stochastic = [i for i, p in enumerate(params) if not p.greedy]
    if not stochastic:
        return tokens
    probs = sampling_probs(logits[stochastic], [params[i] for i in stochastic]).cpu()
    for j, i in enumerate(stochastic):
        tokens[i] = int(
            torch.multinomial(probs[j], 1, generator=token_generator(params[i], output_indices[i], generator))
        )
    return tokens


def token_generator(
    params: SamplingParams, output_index: int, default: torch.Generator | None = None
) -> torch.Generator | None:
    """The generator of one draw: seeded by (seed, output index) for a seeded request, else `default`."""
    if params.seed is None:
        return default
    return torch.Generator().manual_seed(_token_seed(params.seed, output_index))


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row's token is drawn from: softmax after temperature, top-k and top-p."""
    rows = logits.float()
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=rows.device)
    rows = rows / temps[:, None]
    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        vocab = rows.shape[-1]
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_ks], device=rows.device)
        kth = torch.sort(rows, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        rows = rows.masked_fill(rows < kth, float("-inf"))
    top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=rows.device)
    if bool((top_ps < 1).any()):
        sorted_logits, order = torch.sort(rows, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_ps[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        rows = torch.full_like(rows, float("-inf")).scatter(1, order, sorted_logits)
    return torch.softmax(rows, dim=-1)


def verify_sampled(draft: list[int], probs: torch.Tensor, generators: list[torch.Generator | None]) -> tuple[int, int]:
    """Speculative sampling with a deterministic proposer (accepted proposals, the token after them).

    `probs` [len(draft) + 1, V]: the distribution at the last token and at each proposed position;
    `generators[i]` draws position i (seeded per output index for a seeded request).  Each position's token is
    drawn as plain sampling draws it (`sample`: one multinomial draw from the same distribution with the same
    generator), and a proposal is kept while it equals the drawn token.  For a proposer that puts all its mass on
    one token this is speculative sampling's rule (proposal d is kept with probability p_i(d); at a refusal the
    token is distributed as p_i without d, renormalised, which is max(p - q, 0)), so every emitted token has the
    distribution plain sampling gives.  Drawing the token rather than a coin for the proposal also makes a seeded
    request's tokens depend on its logits alone, not on how many tokens were proposed (which the budget,
    spec_budget.py, sets from step times and the rest of the batch).  The caveat is float rounding: a verification
    step computes a position's logits in another summation order than a decode step, so a draw that lands within
    rounding of a cut-off can differ (by hand, one request of four over two runs of 200 sampled tokens diverged at
    its fifth token; the others matched plain sampling token for token)."""
    for i, d in enumerate(draft):
        token = int(torch.multinomial(probs[i], 1, generator=generators[i]))
        if token != d:
            return i, token
    return len(draft), int(torch.multinomial(probs[len(draft)], 1, generator=generators[len(draft)]))


def logprob_entries(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list[list | None]:
    """Per row: None if its request asked for no logprobs, else [token, logprob, [[id, logprob], ...top k]].

    Log-probabilities of the model's raw distribution (log_softmax of the logits, before temperature and
    top-k/top-p), like vLLM's default and OpenAI's; one log_softmax for the rows that asked.
    """
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[list | None] = [None] * len(params)
    if not wanted:
        return out
    logp = torch.log_softmax(logits[wanted].float(), dim=-1)
    k = max(params[i].logprobs or 0 for i in wanted)
    top_vals, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=logp.device)).squeeze(1)
    chosen_l, vals_l, ids_l = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
    for j, i in enumerate(wanted):
        n = params[i].logprobs or 0
        out[i] = [tokens[i], chosen_l[j], [[ids_l[j][r], vals_l[j][r]] for r in range(n)]]
    return out
