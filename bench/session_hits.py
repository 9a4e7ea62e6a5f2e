"""Next-turn prefix hits of agent sessions: for each turn after the first, how much of the prefix it shares with
the session's previous turn was served from cache (device, CPU/disk tier or a peer) instead of recomputed.

Turn k's reusable prefix is the full blocks its prompt shares with turn k-1's prompt (the tokens of the previous
turn's KV that the new prompt repeats); the served part is what the server reported as cached
(`usage.prompt_tokens_details.cached_tokens`), capped at that prefix.
"""

from __future__ import annotations

from typing import Any

from disagg.config import EngineConfig
from disagg.workload.metrics import RequestRecord
from disagg.workload.record import TraceRequest, TraceScale


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def next_turn_hits(
    trace: list[TraceRequest],
    scale: TraceScale,
    records: list[RequestRecord],
    vocab_size: int,
    block_size: int = EngineConfig.block_size,
) -> dict[str, Any] | None:
    """Aggregate next-turn hit ratio (served / reusable tokens) over every later turn that completed, with the
    share of turns that got >= 95% of their reusable prefix; None if the workload has no sessions."""
    by_index = {r.index: r for r in records}
    sessions: dict[str, list[int]] = {}
    for i, req in enumerate(trace):
        if req.session_id is not None:
            sessions.setdefault(req.session_id, []).append(i)
    if not sessions:
        return None
    reusable_total = served_total = turns = full = 0
    for idx in sessions.values():
        idx.sort(key=lambda i: trace[i].turn or 0)
        for prev, cur in zip(idx, idx[1:]):
            rec = by_index.get(cur)
            if rec is None or not rec.ok or rec.cached_tokens is None:
                continue
            shared = _common_prefix(
                scale.prompt(trace[prev], vocab_size, prev), scale.prompt(trace[cur], vocab_size, cur)
            )
            reusable = min(shared, len(scale.prompt(trace[cur], vocab_size, cur)) - 1) // block_size * block_size
            if reusable <= 0:
                continue
            served = min(rec.cached_tokens, reusable)
            reusable_total += reusable
            served_total += served
            turns += 1
            full += served >= 0.95 * reusable
    if not turns:
        return None
    return {
        "turns": turns,
        "reusable_tokens": reusable_total,
        "served_tokens": served_total,
        "hit_ratio": served_total / reusable_total,
        "turns_at_95pct": full / turns,
    }
