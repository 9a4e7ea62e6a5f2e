"""Per-request state inside one engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from disagg.engine.spec import SpecState
from disagg.protocol import LoRARef, PrefillResult, SamplingParams, hash_block_tokens

if TYPE_CHECKING:
    from disagg.engine.mm_inputs import ImageEmbedding


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # blocks reserved, KV being loaded (peer read, CPU or disk tier)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    block_size: int
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks of token_ids
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens not computed for this request (prefix cache, tiers, a peer)
    num_preemptions: int = 0
    finish_reason: str | None = None
    first_token_time: float | None = None
    hold_kv: bool = False  # prefill role: keep the blocks (leased) when finished, for the decode side to read
    remote: PrefillResult | None = None  # KV offered by another worker, read before this sequence computes
    kv_load: Any = None  # the KVLoad in flight while status is WAITING_FOR_KV
    lora: LoRARef | None = None  # the adapter it runs with (engine/lora.py); None: the base model
    pending_first_token: bool = False  # the last token came with a peer's KV and has not been emitted yet
    credited_tokens: int | None = None  # prompt tokens a peer saved from compute (reported as cached)
    imported_logprobs: list | None = None  # the logprob entry of a peer's first token (when asked)
    tier_load_failed: bool = False  # a CPU/disk load failed (corrupt, too slow): recompute, do not retry it
    priority: int = 0  # higher = more important: queued ahead of lower priorities
    trace_context: dict[str, str] = field(default_factory=dict)  # the request's span (tracing)
    # timeline (time.monotonic), for tracing: first admission, KV load, finish
    scheduled_time: float | None = None
    load_start: float | None = None
    load_end: float | None = None
    load_kind: str | None = None  # "peer" | "tiers"
    load_blocks: int = 0
    load_failed: bool = False
    finish_time: float | None = None
    session_id: str | None = None
    kv_retention_s: float | None = None  # pin this session's blocks in the CPU tier for this long when done
    tenant: str | None = None  # namespaces the session's pin (None: the default tenant)
    root_hash: int | None = None  # the salted parent of the first block (disagg/isolation.py); None: unsalted
    images: list[ImageEmbedding] = field(default_factory=list)  # prompt spans that take image rows (mm_inputs.py)
    draft: list[int] = field(default_factory=list)  # tokens proposed for the next step (speculative decoding)
    spec: SpecState | None = None  # its speculation state (None: it does not speculate)
    # incremental detokenization state (engine-owned)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.prefix_offset = self.read_offset = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def update_block_hashes(self) -> None:
        """Extend `block_hashes` to cover every full block of token_ids."""
        bs = self.block_size
        for i in range(len(self.block_hashes), self.num_tokens // bs):
            parent = self.block_hashes[-1] if self.block_hashes else self.root_hash
            self.block_hashes.append(hash_block_tokens(parent, self.token_ids[i * bs : (i + 1) * bs]))

    def cut_at_stop(self) -> str | None:
        """Cut the text where a stop string first occurs (only where new text could complete one); the stop
        string it matched, or None."""
        found = [
            (cut, rank, stop)
            for rank, stop in enumerate(self.sampling.stop)
            if (cut := self.text.find(stop, max(0, self.num_emitted_chars - len(stop)))) != -1
        ]
        if not found:
            return None
        cut, _, stop = min(found)  # the earliest in the text; at the same place, the first one listed
        self.text = self.text[:cut]
        return stop
