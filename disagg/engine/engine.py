"""The engine: admits requests, runs scheduler -> runner steps, applies stop rules, emits TokenDeltas and KVEvents.

Moving KV between workers goes through the engine's KV connector (disagg/kv/connector.py), both ways: it leases
blocks for a reader (`hold_kv` requests and `export_prefix`), and loads another worker's KV for a request
(`add_request(remote=...)`: the scheduler reads it through the connector before computing anything).  A request
can resume after output a client already received from a worker that died (`resume_token_ids`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass
from typing import Any

import torch

from disagg.config import EngineConfig
from disagg.engine.block_pool import BlockPool
from disagg.engine.capacity import check_kv_capacity
from disagg.engine.drafting import apply_verified, decode_only, propose_drafts
from disagg.engine.faults import OutputFault, output_fault
from disagg.engine.intake import Intake
from disagg.engine.mm_inputs import ImageEmbedding
from disagg.engine.model import ModelConfig
from disagg.engine.offline import Completion
from disagg.engine.runner import Runner, load_model
from disagg.engine.scheduler import Scheduler
from disagg.engine.sequence import Sequence
from disagg.engine.spec import Speculator, spec_config
from disagg.engine.step_time import ChunkRule, ChunkSizer, StepFit
from disagg.engine.tokenizer import Tokenizer
from disagg.isolation import salt_root
from disagg.kv.connector import KVConnector, KVSource, KVTiers
from disagg.modes import SpecMethod
from disagg.protocol import (
    FinishReason,
    KVEvent,
    LoRARef,
    PrefillResult,
    Request,
    SamplingParams,
    Tier,
    TokenDelta,
    hash_salt,
)


@dataclass
class EngineStats:
    steps: int = 0
    generated_tokens: int = 0


@dataclass(frozen=True)
class StepRecord:
    """The last model step as it ran: what it computed (the step-time model's features) and the model's time, so
    a traced worker can show how its steps compare with the calibrated model inside a running cluster."""

    tokens: int
    seqs: int
    attention_kpairs: float
    execute_s: float


class LLMEngine:
    def __init__(
        self, config: EngineConfig | None = None, runner: Runner | None = None, tokenizer: Tokenizer | None = None
    ) -> None:
        """runner: the model behind the engine, chosen by the caller.  None: the real model of config.model
        (`load_model`: weights on config.device, its KV cache, its tokenizer); the simulator passes its SimRunner
        (nothing is loaded, no tokenizer).  The block pool covers the runner's KV blocks.

        KV sources besides the device prefix cache (a peer over the transport, the CPU/disk tiers) are injected
        afterwards with `attach`; without them the engine is a plain single-node engine."""
        self.config = config = config or EngineConfig()
        if runner is None:
            runner, tokenizer = load_model(config)
        self.runner: Runner = runner
        self.device, self.dtype = runner.device, runner.dtype
        self.model_config: ModelConfig = runner.model_config
        mc = self.model_config
        self.tokenizer = tokenizer
        self.max_model_len = min(config.max_model_len, mc.max_position_embeddings)
        bs = config.block_size
        check_kv_capacity(runner.num_blocks, bs, self.max_model_len)
        self.pool = BlockPool(runner.num_blocks, config.enable_prefix_caching)
        self.connector = KVConnector(
            self.pool,
            bs,
            load_timeout_s=config.kv_load_timeout_s,
            lease_timeout_s=config.kv_lease_timeout_s,
            probe_every=config.kv_probe_every,
        )
        self.step_fit = StepFit(config.step_fit_window, config.step_fit_every, prefill_tokens=bs)
        target_s = config.prefill_chunk_target_ms / 1000
        self.chunk_rule = ChunkRule(target_s, config.max_num_batched_tokens, config.min_prefill_chunk, bs)
        self.chunking = ChunkSizer(self.step_fit, self.chunk_rule)
        self.scheduler = Scheduler(
            self.pool,
            bs,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.connector,
            chunking=self.chunking if target_s > 0 else None,
            max_loras=config.max_loras,
        )
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.seqs: dict[str, Sequence] = {}
        # prompts checked into sequences
        self.intake = Intake(self.tokenizer, mc.vocab_size, self.max_model_len, bs, mc.hidden_size)
        self.stats = EngineStats()
        self.prefill_s_per_token: float | None = None  # measured, for "is loading cheaper than recomputing"
        self.step_s_per_token: float | None = None  # every model step's time per token (EWMA): gray failures
        self.output_faults: list[OutputFault] = []  # requests failed for impossible output, until drained
        self.on_finish: Any = None  # called (seq, reason) when a traced request finishes (the worker's spans)
        self.last_step: StepRecord | None = None  # the last model step (None before the first)
        spec = spec_config(config)
        self.speculator = Speculator(spec) if spec.method is not SpecMethod.NONE else None

    # ------------------------------------------------------------------ wiring
    @property
    def kv_tensor(self) -> torch.Tensor | None:
        cache = self.runner.kv_cache
        return cache.tensor if cache is not None else None

    @property
    def kv_format(self) -> str:
        """The KV cache's resolved element format (`--kv-dtype`; auto named by its dtype)."""
        cache = self.runner.kv_cache
        return cache.format.name if cache is not None else str(self.dtype).removeprefix("torch.")

    def attach(self, peer: KVSource | None = None, tiers: KVTiers | None = None) -> None:
        """Inject the KV sources: a PeerSource (reads over the worker's transport) and/or the tiers."""
        self.connector.attach(peer, tiers)

    @property
    def tiers(self) -> KVTiers | None:
        return self.connector.tiers

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        sampling: SamplingParams | dict | None = None,
        *,
        hold_kv: bool = False,
        remote: PrefillResult | None = None,
        resume_token_ids: Sequence_[int] = (),
        resume_num_chars: int = 0,
        session_id: str | None = None,
        kv_retention_s: float | None = None,
        priority: int = 0,
        trace_context: dict[str, str] | None = None,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        tenant: str | None = None,
        lora: LoRARef | None = None,
        images: Sequence_[ImageEmbedding] = (),
    ) -> None:
        """Validate and queue a request. Bad input raises ValueError and leaves the engine untouched.

        hold_kv: when the request finishes, its blocks are leased for another worker to read (prefill role).
        remote: another worker's KV for this prompt (its prefill result): read before computing anything.
        resume_token_ids / resume_num_chars: output already delivered by a worker that died (migration).
        session_id / kv_retention_s: pin the session's blocks in the CPU tier for that long when done.
        cache_salt / tenant: the salt block hashes chain from, the tenant the session is namespaced by (isolation.py).
        lora: the adapter it runs with (loaded now if need be; a bad one raises ValueError): its KV is its own.
        images: the prompt's images, their embedding rows for the positions their placeholder ids hold.
        arrival_time: when the request reached this worker (time.monotonic(); default now): a worker stamps
        it on receipt, so the time waiting for the engine thread counts as queueing.
        """
        seq = self.intake.new_sequence(request_id, prompt, sampling, taken=self.seqs, images=images)
        if lora is not None:
            self.runner.load_lora(lora)
        seq.root_hash = salt_root(hash_salt(cache_salt, lora))  # before any hash is taken; the router's too
        seq.tenant, seq.lora = tenant, lora
        if resume_token_ids:
            self.intake.resume(seq, list(resume_token_ids), resume_num_chars)
        if remote is not None and remote.num_tokens != seq.num_tokens and remote.first_token is not None:
            raise ValueError(f"prefill result covers {remote.num_tokens} tokens, the request has {seq.num_tokens}")
        seq.hold_kv, seq.remote, seq.priority = hold_kv, remote, priority
        if remote is not None and remote.first_token is not None:
            seq.imported_logprobs = remote.first_logprobs
        seq.session_id, seq.kv_retention_s = session_id, kv_retention_s
        seq.trace_context = trace_context or {}
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        tiers = self.tiers
        if kv_retention_s and session_id and tiers is not None and tiers.is_pinned_session(session_id, tenant):
            seq.update_block_hashes()  # the next turn of a pinned session: bring its prefix back now
            self.connector.prefetch(seq.block_hashes[: (seq.num_tokens - 1) // self.config.block_size])

    def add(
        self,
        request: Request,
        *,
        hold_kv: bool = False,
        remote: PrefillResult | None = None,
        arrival_time: float | None = None,
        images: Sequence_[ImageEmbedding] = (),
    ) -> None:
        """add_request for a wire Request; `images`: its images' embeddings (the worker's encoder or the encoder
        stage made them from `request.images`)."""
        self.add_request(
            request.request_id,
            request.prompt_token_ids,
            request.sampling,
            hold_kv=hold_kv,
            remote=remote,
            resume_token_ids=request.resume_token_ids,
            resume_num_chars=request.resume_num_chars,
            session_id=request.session_id,
            kv_retention_s=request.kv_retention_s,
            priority=request.priority,
            trace_context=request.trace_context,
            arrival_time=arrival_time,
            cache_salt=request.cache_salt,
            tenant=request.tenant,
            lora=request.lora,
            images=images,
        )

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, FinishReason.ABORT.value)
        return True

    # ------------------------------------------------------------------ state
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def drain_kv_events(self) -> list[KVEvent]:
        return self.pool.drain_events() + self.connector.drain_events()

    def kv_hashes(self) -> dict[Tier, list[int]]:
        """Every block hash held now, per tier (a snapshot for the router)."""
        out = {Tier.DEVICE: self.pool.cached_hashes()}
        if self.tiers is not None:
            out.update(self.tiers.tier_hashes())
        return out

    # ------------------------------------------------------------------ one step
    def step(self) -> list[TokenDelta]:
        self.connector.tick()
        arrived = self.scheduler.poll_loads()
        if arrived:  # a peer's prefill landed: its first token goes out now, the model runs on the next call
            for seq in arrived:
                seq.pending_first_token = False
            return [self._process_token(seq, seq.token_ids[-1], imported=True) for seq in arrived]
        if self.speculator is not None:
            propose_drafts(self.speculator, self.scheduler.running, self.max_model_len)
        batch = self.scheduler.schedule()
        deltas = [self._process_token(seq, seq.token_ids[-1], imported=True) for seq in batch.imported]
        if batch.imported and any(seq.is_finished for seq in batch.seqs):  # max_tokens=1: done with the first
            keep = [i for i, seq in enumerate(batch.seqs) if not seq.is_finished]
            batch.seqs = [batch.seqs[i] for i in keep]
            batch.num_new_tokens = [batch.num_new_tokens[i] for i in keep]
            batch.drafts = [batch.drafts[i] for i in keep]
        if not batch.seqs:
            return deltas
        if any(seq.lora is not None for seq in batch.seqs):
            batch.order_by_adapter()  # one contiguous run of tokens per adapter
        decoding = self.speculator is not None and decode_only(batch)  # (before the step moves the counts on)
        sampled = self.runner.execute(batch)
        seconds = self.runner.last_step_s  # measured, or modelled by a stand-in (simulation)
        if decoding and seconds is not None and self.speculator is not None:
            self.speculator.times.add(batch.total_tokens, seconds)
        self.last_step = StepRecord(batch.total_tokens, len(batch.seqs), batch.attention_kpairs(), seconds or 0.0)
        if seconds is not None:  # (None: the stand-in's driver measures the step when it ends)
            self.measure(self.last_step)
        verified = self.runner.last_verified
        accepted = apply_verified(self.speculator, batch, verified) if self.speculator and verified else {}
        self.scheduler.on_step_done(batch)
        self.stats.steps += 1
        now = time.monotonic()
        logprobs = self.runner.last_logprobs
        for row, token in sampled.items():
            seq = batch.seqs[row]
            for t in [*accepted.get(row, ()), token]:  # accepted proposals first, then the model's own token
                if (fault := output_fault(t, self.model_config.vocab_size)) is not None:
                    self.output_faults.append(OutputFault(seq.request_id, fault))
                    self.abort(seq.request_id)  # never served: the worker fails it; the router retries elsewhere
                    break
                if seq.first_token_time is None:
                    seq.first_token_time = now
                seq.token_ids.append(t)
                self.stats.generated_tokens += 1
                deltas.append(self._process_token(seq, t, logprobs=logprobs.get(row)))
                if seq.is_finished:  # a stop or the length limit inside the accepted proposals
                    break
        return deltas

    def drain_output_faults(self) -> list[OutputFault]:
        faults, self.output_faults = self.output_faults, []
        return faults

    def measure(self, step: StepRecord) -> None:
        """Fold a model step's time into the speeds this engine reports (its step-time fit, seconds per token,
        prefill seconds per token).  `step` calls it with the runner's time; a driver that learns the time only
        when the step ends (the simulator, for workers sharing cores) calls it then."""
        tokens, seconds = step.tokens, step.execute_s
        self.step_fit.add(tokens, step.seqs, step.attention_kpairs, seconds)
        alpha = self.config.prefill_ewma_alpha
        per_token = seconds / tokens
        old = self.step_s_per_token
        self.step_s_per_token = per_token if old is None else (1 - alpha) * old + alpha * per_token
        if tokens < self.config.block_size:  # decode-only steps say little about prefill cost
            return
        old = self.prefill_s_per_token
        self.prefill_s_per_token = per_token if old is None else (1 - alpha) * old + alpha * per_token
        self.connector.recompute_s_per_block = self.prefill_s_per_token * self.config.block_size

    def _process_token(
        self, seq: Sequence, token: int, imported: bool = False, logprobs: list | None = None
    ) -> TokenDelta:
        sp = seq.sampling
        reason = matched_stop = None
        visible = True
        if imported:
            seq.first_token_time = time.monotonic()
            self.stats.generated_tokens += 1
            logprobs = seq.imported_logprobs
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids):
            reason, visible = FinishReason.STOP.value, False
        elif len(seq.output_token_ids) >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH.value
        if self.tokenizer is not None and visible:
            new_text, seq.prefix_offset, seq.read_offset = self.tokenizer.decode_incremental(
                seq.token_ids, seq.prefix_offset, seq.read_offset
            )
            seq.text += new_text
            if (matched_stop := seq.cut_at_stop()) is not None:
                reason = FinishReason.STOP.value
        if reason is not None:
            self._retire(seq, reason)
        # Hold back text that could be the start of a stop string until it is decided.
        hold = 0 if reason else max((len(s) - 1 for s in sp.stop), default=0)
        emit_to = max(seq.num_emitted_chars, len(seq.text) - hold)
        text = seq.text[seq.num_emitted_chars : emit_to]
        seq.num_emitted_chars = emit_to
        return TokenDelta(
            request_id=seq.request_id,
            token_ids=[token],
            text=text,
            finish_reason=FinishReason(reason) if reason is not None else None,
            matched_stop=matched_stop,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=[logprobs] if logprobs is not None and sp.logprobs is not None else None,
            num_proposed_tokens=seq.spec.proposed if seq.spec is not None else 0,
            num_accepted_tokens=seq.spec.accepted if seq.spec is not None else 0,
        )

    def _retire(self, seq: Sequence, reason: str) -> None:
        seq.finish_time = time.monotonic()
        if self.on_finish is not None and seq.trace_context:
            self.on_finish(seq, reason)
        if self.connector.request_finished(seq):  # leased for a reader (hold_kv): the connector's blocks now
            seq.block_ids = []
        self.scheduler.finish(seq, reason)
        del self.seqs[seq.request_id]

    # ------------------------------------------------------------------ offline convenience
    def generate(
        self, prompts: Iterable[str | list[int]], sampling: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run prompts to completion together (continuous batching) and return them in input order."""
        from disagg.engine.offline import run_to_completion

        return run_to_completion(self, prompts, sampling)
