"""Continuous batching with chunked prefill and preemption by recompute (vLLM v1 style, one token budget), with
loading KV as a scheduler state.

Each step: finished KV loads rejoin the queue, then running sequences (each decode needs 1 token, an unfinished
prefill takes the rest of its prompt up to the budget), then waiting ones in arrival order while budget,
sequence slots and blocks last.  When a waiting sequence is admitted, its leading blocks come from the device
prefix cache; past those, the KV connector may offer more (a peer's prefill result, the CPU or disk tier):
then blocks are reserved, the load starts and the sequence waits in WAITING_FOR_KV, polled every step, without
holding up the queue behind it.  A finished load puts it back at the head with its computed tokens advanced; a
failed one (or the failed part of one) is recomputed.  A sequence that cannot get a block preempts the most
recently admitted running sequence: its blocks are freed (full blocks stay in the prefix cache, so the
recompute is usually cheap) and it goes back to the head of the queue.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from disagg.engine.batch import ScheduledBatch
from disagg.engine.block_pool import BlockPool, NoFreeBlocksError
from disagg.engine.sequence import Sequence, SequenceStatus
from disagg.engine.step_time import ChunkSizer
from disagg.errors import TransferFailed
from disagg.kv.connector import KVConnector, KVLoad, LoadState, SourceKind
from disagg.utils import cdiv

log = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which found cached on the device
    loaded_tokens: int = 0  # of which loaded from a peer or a tier instead of computed
    failed_loads: int = 0  # loads that (partly) failed and were recomputed


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        connector: KVConnector | None = None,
        chunking: ChunkSizer | None = None,
        max_loras: int = 0,
    ) -> None:
        self.pool = pool
        self.max_loras = max_loras  # distinct LoRA adapters among the active sequences (0: no cap)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.connector = connector or KVConnector(pool, block_size)
        self.chunking = chunking  # None: prompt chunks take whatever the fixed budget leaves
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence: after every waiting one of its priority or higher (FIFO within a priority)."""
        if self.waiting and seq.priority > self.waiting[-1].priority:
            for i, other in enumerate(self.waiting):
                if other.priority < seq.priority:
                    self.waiting.insert(i, seq)
                    return
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    @property
    def num_active(self) -> int:
        return len(self.running) + len(self.loading)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self.poll_loads()
        budget = self.max_num_batched_tokens
        if any(seq.priority for seq in self.running):
            self.running.sort(key=lambda s: -s.priority)  # higher priorities take the step's budget first (stable)
        prompt_left = self._prompt_allowance()  # prompt tokens this step may carry beside its decodes
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n > 1:  # an unfinished prefill: its chunk comes out of the prompt allowance
                n = min(n, prompt_left)
                if n <= 0:
                    i += 1
                    continue
            draft = seq.draft if n == 1 and 1 + len(seq.draft) <= budget else []
            seq.draft = []  # a proposal is for this step only
            n += len(draft)
            while not self._reserve(seq, n):
                if draft:  # a proposal is optional: drop it before anyone gives up blocks for it
                    n, draft = n - len(draft), []
                    continue
                if self._release_waiting_blocks(keep=None):
                    continue  # queued sequences give up loaded blocks before a running one is preempted
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                batch.drafts.append(draft)
                budget -= n
                if not draft and n > 1:
                    prompt_left -= n
                i += 1
        if batch.preempted:
            return batch  # memory is short: admit nothing new this step
        self._admit_waiting(batch, budget, prompt_left)
        return batch

    def _adapters(self) -> set[tuple[str, str, str]]:
        return {s.lora.key() for s in (*self.running, *self.loading) if s.lora is not None}

    def _admit_waiting(self, batch: ScheduledBatch, budget: int, prompt_left: int) -> None:
        """Admit queued sequences in order while the step's budget, the sequence slots and the blocks last.  A
        sequence whose adapter would be one too many (`max_loras`, as vLLM's) waits, keeping its place, while the
        ones behind it may go (its adapter's requests are admitted as soon as a slot frees)."""
        adapters, deferred = self._adapters(), []
        try:  # the deferred go back to the head of the queue even if an admission raises
            while self.waiting and min(budget, prompt_left) > 0 and self.num_active < self.max_num_seqs:
                seq = self.waiting[0]
                key = seq.lora.key() if seq.lora is not None else None
                if key is not None and key not in adapters and 0 < self.max_loras <= len(adapters):
                    deferred.append(self.waiting.popleft())
                    continue
                admitted = self._admit(seq, min(budget, prompt_left))
                if admitted is None:
                    if not self.running and self._release_waiting_blocks(keep=seq):
                        continue  # nothing runs that could free blocks: take them from sequences queued behind
                    break
                self.waiting.popleft()
                if key is not None:
                    adapters.add(key)
                if seq.status is SequenceStatus.WAITING_FOR_KV:
                    continue
                if seq.pending_first_token:  # a peer's prefill result: its first token goes out now
                    seq.pending_first_token = False
                    batch.imported.append(seq)
                if seq.scheduled_time is None:
                    seq.scheduled_time = time.monotonic()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(admitted)
                batch.drafts.append([])
                budget -= admitted
                prompt_left -= admitted
        finally:
            self.waiting.extendleft(reversed(deferred))

    def _prompt_allowance(self) -> int:
        """Prompt tokens this step may take: the fixed budget, or with a `ChunkSizer` and decodes in the step, what
        keeps the step within its time target (the decode rows are counted as the loop below will take them)."""
        if self.chunking is None:
            return self.max_num_batched_tokens
        tokens = seqs = 0
        kpairs = 0.0
        context = None
        for seq in self.running:
            left = seq.num_tokens - seq.num_computed_tokens
            if left == 1:
                n = 1 + len(seq.draft)
                tokens, seqs = tokens + n, seqs + 1
                kpairs += n * (seq.num_computed_tokens + n) / 1000
            elif context is None:
                context = seq.num_computed_tokens
        if context is None and self.waiting:
            context = self.waiting[0].num_computed_tokens
        return self.chunking.prefill_budget(tokens, seqs, kpairs, context or 0)

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Reserve what the head of the queue needs: the tokens it computes this step (0 when it starts a KV
        load instead), or None if the pool is short."""
        hits: list[int] = []
        if not seq.block_ids:
            hits = self._lookup_prefix(seq)
            load = self.connector.plan(seq, len(hits))
            if load is not None:
                return self._start_load(seq, hits, load)
            if seq.remote is not None:
                self._remote_already_cached(seq)
        computed = len(hits) * self.block_size if hits else seq.num_computed_tokens
        n = min(seq.num_tokens - computed, budget)
        if hits:
            self.pool.touch(hits)
        if not self._reserve(seq, n, extra_blocks=hits, computed=computed):
            if hits:
                self.pool.free(hits)
            return None
        if hits:
            seq.block_ids = hits + seq.block_ids
            seq.num_computed_tokens = computed
            seq.num_registered_blocks = len(hits)
        if seq.num_preemptions == 0 and seq.first_token_time is None and seq.credited_tokens is None:
            seq.num_cached_tokens = min(computed, seq.num_prompt_tokens)
        return n

    def _lookup_prefix(self, seq: Sequence) -> list[int]:
        seq.update_block_hashes()
        if seq.remote is not None and seq.remote.first_token is not None:
            usable = seq.remote.num_tokens // self.block_size  # the first token is known: every full block counts
        else:  # leave at least one token to compute so the step yields logits for the next token
            usable = (seq.num_tokens - 1) // self.block_size
        hits = self.pool.lookup_prefix(seq.block_hashes[:usable])
        self.stats.prefix_query_tokens += seq.num_prompt_tokens
        self.stats.prefix_hit_tokens += min(len(hits) * self.block_size, seq.num_prompt_tokens)
        return hits

    def _remote_already_cached(self, seq: Sequence) -> None:
        """Every block the peer offered is in the local prefix cache: nothing to read; let the peer go."""
        result = seq.remote
        assert result is not None  # only called for a sequence with a peer's offer
        self.connector.remote_without_read(seq)
        seq.remote = None
        seq.credited_tokens = result.num_cached_tokens if result.first_token is not None else result.num_tokens
        seq.num_cached_tokens = min(seq.credited_tokens, seq.num_prompt_tokens)
        if result.first_token is not None:
            seq.token_ids.append(result.first_token)
            seq.pending_first_token = True

    def _start_load(self, seq: Sequence, hits: list[int], load: KVLoad) -> int | None:
        self.pool.touch(hits)
        try:
            dst = self.pool.allocate(load.num_blocks)
        except NoFreeBlocksError:
            self.pool.free(hits)
            return None
        seq.block_ids = hits + dst
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_registered_blocks = len(hits)
        load.dst_block_ids = dst
        seq.kv_load = load
        seq.load_start, seq.load_kind, seq.load_blocks = time.monotonic(), load.kind.value, load.num_blocks
        if seq.scheduled_time is None:
            seq.scheduled_time = seq.load_start
        seq.status = SequenceStatus.WAITING_FOR_KV
        self.loading.append(seq)
        try:
            self.connector.start(load)
        except (TransferFailed, OSError) as exc:  # could not even start: handled as a failed load next step
            log.warning("KV load for %s failed to start: %s", seq.request_id, exc)
        return 0

    def poll_loads(self) -> list[Sequence]:
        """Move finished loads back to the head of the queue; returns those that came with a peer's first token
        (the engine emits it at once, so a disaggregated request's TTFT does not wait for a decode step)."""
        with_token = []
        for seq in list(self.loading):
            load: KVLoad = seq.kv_load
            state = self.connector.poll(load)
            if state is LoadState.PENDING:
                continue
            self.loading.remove(seq)
            seq.kv_load = None
            seq.load_end = time.monotonic()
            seq.load_failed = not (state is LoadState.DONE and load.num_ok_blocks == load.num_blocks)
            remote = seq.remote
            if state is LoadState.DONE and load.num_ok_blocks == load.num_blocks:
                seq.num_computed_tokens = load.num_tokens
                if load.first_token is not None:
                    seq.token_ids.append(load.first_token)
                    seq.pending_first_token = True
                if remote is not None:  # credit what the peer did not compute, not what was read
                    seq.credited_tokens = (
                        remote.num_cached_tokens if load.first_token is not None else remote.num_tokens
                    )
            else:
                self.stats.failed_loads += 1
                seq.tier_load_failed = load.kind is SourceKind.TIERS
                good = load.first_block + load.num_ok_blocks
                if not self.connector.release_failed(load):
                    seq.block_ids = seq.block_ids[:good]  # the connector keeps the rest until no write can land
                seq.num_computed_tokens = good * self.block_size
            seq.remote = None
            self.stats.loaded_tokens += seq.num_computed_tokens - load.first_block * self.block_size
            self.register_full_blocks(seq)
            if seq.num_preemptions == 0 and seq.first_token_time is None:
                credited = seq.num_computed_tokens if seq.credited_tokens is None else seq.credited_tokens
                seq.num_cached_tokens = min(credited, seq.num_prompt_tokens)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
            if seq.pending_first_token:
                with_token.append(seq)
        return with_token

    def _reserve(
        self, seq: Sequence, n: int, extra_blocks: list[int] | None = None, computed: int | None = None
    ) -> bool:
        """Allocate the blocks `seq` needs to hold `n` more tokens; False if the pool is short."""
        have = len(seq.block_ids) + len(extra_blocks or [])
        computed = seq.num_computed_tokens if computed is None else computed
        need = cdiv(computed + n, self.block_size) - have
        if need <= 0:
            return True
        if need > self.pool.num_free_blocks:
            return False
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def _release_waiting_blocks(self, keep: Sequence | None) -> bool:
        """Free the blocks held by waiting sequences other than `keep` (KV that arrived by a load; its full
        blocks stay in the prefix cache, so they usually hit again).  False if none held any."""
        freed = False
        for seq in reversed(self.waiting):
            if seq is not keep and seq.block_ids:
                self.pool.free(seq.block_ids)
                seq.block_ids = []
                seq.num_computed_tokens = seq.num_registered_blocks = 0
                freed = True
        return freed

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
        """Advance computed counts and offer newly full blocks to the prefix cache (and the tiers)."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.register_full_blocks(seq)

    def register_full_blocks(self, seq: Sequence) -> None:
        # accepted proposals are computed before they are appended to token_ids: register what both cover
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if full <= seq.num_registered_blocks:
            return
        seq.update_block_hashes()
        start = seq.num_registered_blocks
        parent = seq.block_hashes[start - 1] if start else seq.root_hash
        self.pool.cache_blocks(seq.block_ids[start:full], seq.block_hashes[start:full], parent)
        self.connector.on_computed(seq.block_ids[start:full], seq.block_hashes[start:full])
        seq.num_registered_blocks = full

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (finished or aborted) wherever it is, returning its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SequenceStatus.WAITING_FOR_KV:
            self.loading.remove(seq)
            load: KVLoad = seq.kv_load
            self.connector.cancel(load)  # its destination blocks: freed now or once no write can land
            seq.block_ids = seq.block_ids[: load.first_block]
            seq.kv_load = None
        if seq.block_ids:
            self.pool.free(seq.block_ids)
            seq.block_ids = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
