"""Continuous batching with chunked prefill and preemption by recompute (vLLM v1 style, one token budget).

Each step: running sequences first (each decode needs 1 token, an unfinished prefill takes the rest of its prompt
up to the budget), then waiting ones in arrival order while budget, sequence slots and blocks last.  A sequence
that cannot get a block preempts the most recently admitted running sequence: its blocks are freed (full blocks
stay in the prefix cache, so the recompute is usually cheap) and it goes back to the head of the queue.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from disagg.engine.block_pool import BlockPool
from disagg.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which found cached


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_computed(self, seq: Sequence) -> None:
        """Queue a sequence whose prompt KV is already in its blocks (imported): it resumes at the head."""
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.register_full_blocks(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._reserve(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        if batch.preempted:
            return batch  # memory is short: admit nothing new this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self._lookup_prefix(seq) if not seq.block_ids else []
            computed = len(hits) * self.block_size if hits else seq.num_computed_tokens
            n = min(seq.num_tokens - computed, budget)
            if hits:
                self.pool.touch(hits)
            if not self._reserve(seq, n, extra_blocks=hits, computed=computed):
                if hits:
                    self.pool.free(hits)
                break
            if hits:
                seq.block_ids = hits + seq.block_ids
                seq.num_computed_tokens = computed
                seq.num_registered_blocks = len(hits)
            if seq.num_preemptions == 0 and seq.first_token_time is None:
                seq.num_cached_tokens = computed
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _lookup_prefix(self, seq: Sequence) -> list[int]:
        seq.update_block_hashes()
        # Leave at least one token to compute so the step yields logits for the next token.
        usable = (seq.num_tokens - 1) // self.block_size
        hits = self.pool.lookup_prefix(seq.block_hashes[:usable])
        self.stats.prefix_query_tokens += seq.num_prompt_tokens
        self.stats.prefix_hit_tokens += min(len(hits) * self.block_size, seq.num_prompt_tokens)
        return hits

    def _reserve(self, seq: Sequence, n: int, extra_blocks: list[int] | None = None,
                 computed: int | None = None) -> bool:
        """Allocate the blocks `seq` needs to hold `n` more tokens; False if the pool is short."""
        have = len(seq.block_ids) + len(extra_blocks or [])
        computed = seq.num_computed_tokens if computed is None else computed
        need = -(-(computed + n) // self.block_size) - have
        if need <= 0:
            return True
        if need > self.pool.num_free_blocks:
            return False
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.stats.num_preemptions += 1

    # ------------------------------------------------------------------ after the model ran
    def on_step_done(self, batch: ScheduledBatch) -> None:
        """Advance computed counts and offer newly full blocks to the prefix cache."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.register_full_blocks(seq)

    def register_full_blocks(self, seq: Sequence) -> None:
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_registered_blocks:
            return
        seq.update_block_hashes()
        start = seq.num_registered_blocks
        parent = seq.block_hashes[start - 1] if start else None
        self.pool.cache_blocks(seq.block_ids[start:full], seq.block_hashes[start:full], parent)
        seq.num_registered_blocks = full

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (finished or aborted) wherever it is, returning its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.block_ids:
            self.pool.free(seq.block_ids)
            seq.block_ids = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
