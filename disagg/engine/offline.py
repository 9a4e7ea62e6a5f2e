"""Offline use of one engine: run prompts to completion together and collect them (`LLMEngine.generate`)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from disagg.protocol import SamplingParams

if TYPE_CHECKING:
    from disagg.engine.engine import LLMEngine


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int
    ttft_s: float = 0.0
    e2e_s: float = 0.0


def run_to_completion(
    engine: LLMEngine, prompts: Iterable[str | list[int]], sampling: SamplingParams | list[SamplingParams] | None
) -> list[Completion]:
    """Run prompts to completion together (continuous batching) and return them in input order."""
    prompts = list(prompts)
    params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
    start = time.monotonic()
    ids = [f"gen-{id(engine)}-{start}-{i}" for i in range(len(prompts))]
    seqs = []
    for rid, prompt, sp in zip(ids, prompts, params):
        engine.add_request(rid, prompt, sp)
        seqs.append(engine.seqs[rid])
    texts = {rid: "" for rid in ids}
    while any(not s.is_finished for s in seqs):
        for delta in engine.step():
            if delta.request_id in texts:
                texts[delta.request_id] += delta.text
    return [
        Completion(
            s.request_id,
            s.prompt_token_ids,
            s.output_token_ids,
            texts[s.request_id],
            s.finish_reason or "",
            s.num_cached_tokens,
            ttft_s=(s.first_token_time or start) - start,
            e2e_s=time.monotonic() - start,
        )
        for s in seqs
    ]
