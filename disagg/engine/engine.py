"""The engine: admits requests, runs scheduler -> runner steps, applies stop rules, emits TokenDeltas and KVEvents."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from disagg.config import EngineConfig
from disagg.engine.block_pool import BlockPool
from disagg.engine.handoff import ImportPlan, LeaseTable, plan_import
from disagg.engine.kv_cache import bytes_per_block
from disagg.engine.model import ModelConfig
from disagg.engine.runner import ModelRunner
from disagg.engine.scheduler import Scheduler
from disagg.engine.sequence import Sequence
from disagg.engine.tokenizer import Tokenizer
from disagg.protocol import KVEvent, PrefillResult, SamplingParams, TokenDelta


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


@dataclass
class EngineStats:
    steps: int = 0
    generated_tokens: int = 0
    prompt_tokens_computed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, runner: Any = None,
                 model_config: ModelConfig | None = None) -> None:
        """runner + model_config: a stand-in for the model (the bench's simulated workers): nothing is loaded,
        the config's model directory is not read, and config.num_blocks sizes the pool."""
        self.config = config = config or EngineConfig()
        simulated = runner is not None
        if simulated and (model_config is None or not config.num_blocks):
            raise ValueError("a stand-in runner needs model_config and config.num_blocks")
        if not simulated and not config.model:
            from disagg.model_store import default_model_dir
            config.model = str(default_model_dir())
        model_dir = Path(config.model)
        self.device = torch.device("cpu") if simulated else resolve_device(config.device)
        if config.num_threads and self.device.type == "cpu" and not simulated:
            torch.set_num_threads(config.num_threads)
        dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
        self.model_config = mc = model_config if simulated else ModelConfig.from_dir(model_dir)
        self.tokenizer = None
        if not simulated and (model_dir / "tokenizer.json").exists():
            self.tokenizer = Tokenizer.from_dir(model_dir)
        self.max_model_len = min(config.max_model_len, mc.max_position_embeddings)
        bs = config.block_size
        num_blocks = config.num_blocks or (config.kv_cache_memory_mb << 20) // bytes_per_block(mc, bs, dtype)
        if num_blocks * bs < self.max_model_len:
            raise ValueError(f"KV cache of {num_blocks} blocks x {bs} tokens cannot hold one sequence of "
                             f"max_model_len={self.max_model_len}; raise num_blocks or lower max_model_len")
        self.pool = BlockPool(num_blocks, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, bs, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = runner or ModelRunner(model_dir, mc, num_blocks, bs, self.device, dtype)
        self.eos_token_ids = set(mc.eos_token_ids)
        if self.tokenizer and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.seqs: dict[str, Sequence] = {}
        self.leases = LeaseTable(self.pool, config.kv_lease_timeout_s)  # prefill role: blocks awaiting a reader
        self.importing: dict[str, Sequence] = {}  # decode role: prompts whose KV is being read from a peer
        self.stats = EngineStats()

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int],
                    sampling: SamplingParams | dict | None = None, hold_kv: bool = False) -> None:
        """Validate and queue a request. Bad input raises ValueError and leaves the engine untouched.

        hold_kv (prefill role): when the request finishes, its blocks are leased for a decode worker to read.
        """
        seq = self._new_sequence(request_id, prompt, sampling)
        seq.hold_kv = hold_kv
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def _new_sequence(self, request_id: str, prompt: str | list[int],
                      sampling: SamplingParams | dict | None) -> Sequence:
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(sampling, dict):
            sampling = SamplingParams.from_dict(sampling)
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ValueError("sampling must be SamplingParams or a dict")
        token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; the context holds {self.max_model_len} "
                             f"(prompt + at least one generated token)")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model directory has none")
        return Sequence(request_id, token_ids, sampling, self.config.block_size)

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt) if prompt else []
        if not isinstance(prompt, (list, tuple)):
            raise ValueError("prompt must be a string or a list of token ids")
        return list(prompt)

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if self.importing.pop(request_id, None) is not None:
            self.pool.free(seq.block_ids)
            seq.block_ids = []
        self.scheduler.finish(seq, "abort")
        return True

    # ------------------------------------------------------------------ prefill role
    def prefill_result(self, request_id: str, agent_name: str, first_token: int,
                       finish_reason: str | None) -> PrefillResult:
        """Describe a finished hold_kv request's leased blocks for the decode side."""
        lease = self.leases.leases[request_id]
        return PrefillResult(request_id=request_id, agent_name=agent_name, block_ids=list(lease.block_ids),
                             num_prompt_tokens=lease.num_tokens, first_token=first_token,
                             finish_reason=finish_reason)

    # ------------------------------------------------------------------ decode role
    def import_remote(self, request_id: str, prompt: list[int], sampling: SamplingParams | dict | None,
                      result: PrefillResult) -> ImportPlan:
        """Reserve blocks for a remotely prefilled prompt; the caller reads `plan.remote_blocks` into
        `plan.local_blocks`, then calls commit_import (or abort_import). Raises NoFreeBlocksError if short."""
        seq = self._new_sequence(request_id, prompt, sampling)
        if result.num_prompt_tokens != seq.num_prompt_tokens:
            raise ValueError("prefill result does not match the prompt")
        plan = plan_import(seq, self.pool, result.block_ids)
        self.scheduler.stats.prefix_query_tokens += seq.num_prompt_tokens
        self.scheduler.stats.prefix_hit_tokens += seq.num_cached_tokens
        seq.token_ids.append(result.first_token)
        self.seqs[request_id] = seq
        self.importing[request_id] = seq
        return plan

    def commit_import(self, request_id: str) -> TokenDelta:
        """The KV has landed: the sequence joins the batch and its first token (from prefill) is emitted."""
        seq = self.importing.pop(request_id)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.first_token_time = time.monotonic()
        self.scheduler.add_computed(seq)
        self.stats.generated_tokens += 1
        return self._process_token(seq, seq.token_ids[-1])

    def abort_import(self, request_id: str) -> None:
        """The read failed: drop the reserved blocks and prefill locally instead (recompute)."""
        seq = self.importing.pop(request_id)
        self.pool.free(seq.block_ids)
        seq.block_ids, seq.num_computed_tokens, seq.num_registered_blocks = [], 0, 0
        seq.num_cached_tokens = 0
        del seq.token_ids[seq.num_prompt_tokens:]
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def drain_kv_events(self) -> list[KVEvent]:
        return self.pool.drain_events()

    # ------------------------------------------------------------------ one step
    def step(self) -> list[TokenDelta]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        sampled = self.runner.execute(batch)
        self.scheduler.on_step_done(batch)
        self.stats.steps += 1
        deltas = []
        now = time.monotonic()
        for row, token in sampled.items():
            seq = batch.seqs[row]
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.token_ids.append(token)
            self.stats.generated_tokens += 1
            deltas.append(self._process_token(seq, token))
        return deltas

    def _process_token(self, seq: Sequence, token: int) -> TokenDelta:
        sp = seq.sampling
        reason = None
        visible = True
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids):
            reason, visible = "stop", False
        elif len(seq.output_token_ids) >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if self.tokenizer is not None and visible:
            new_text, seq.prefix_offset, seq.read_offset = self.tokenizer.decode_incremental(
                seq.token_ids, seq.prefix_offset, seq.read_offset)
            seq.text += new_text
            for stop in sp.stop:
                cut = seq.text.find(stop, max(0, seq.num_emitted_chars - len(stop)))
                if cut != -1:
                    seq.text = seq.text[:cut]
                    reason = "stop"
        if reason is not None:
            if seq.hold_kv:
                self.leases.hold(seq.request_id, seq.block_ids, seq.num_prompt_tokens)
                seq.block_ids = []
            self.scheduler.finish(seq, reason)
            del self.seqs[seq.request_id]
        # Hold back text that could be the start of a stop string until it is decided.
        hold = 0 if reason else max((len(s) - 1 for s in sp.stop), default=0)
        emit_to = max(seq.num_emitted_chars, len(seq.text) - hold)
        text = seq.text[seq.num_emitted_chars:emit_to]
        seq.num_emitted_chars = emit_to
        return TokenDelta(request_id=seq.request_id, token_ids=[token], text=text, finish_reason=reason,
                          num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens)

    # ------------------------------------------------------------------ offline convenience
    def generate(self, prompts: Iterable[str | list[int]],
                 sampling: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts to completion together (continuous batching) and return them in input order."""
        prompts = list(prompts)
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        start = time.monotonic()
        ids = [f"gen-{id(self)}-{start}-{i}" for i in range(len(prompts))]
        seqs = []
        for rid, prompt, sp in zip(ids, prompts, params):
            self.add_request(rid, prompt, sp)
            seqs.append(self.seqs[rid])
        texts = {rid: "" for rid in ids}
        while any(not s.is_finished for s in seqs):
            for delta in self.step():
                if delta.request_id in texts:
                    texts[delta.request_id] += delta.text
        return [Completion(s.request_id, s.prompt_token_ids, s.output_token_ids, texts[s.request_id],
                           s.finish_reason or "", s.num_cached_tokens,
                           ttft_s=(s.first_token_time or start) - start, e2e_s=time.monotonic() - start)
                for s in seqs]
