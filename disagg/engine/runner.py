"""The engine's model seam: the `Runner` protocol (what the engine needs of a model: run a scheduled batch, how
long the step took, the rows' logprobs, the KV cache it holds), and its real implementation, `ModelRunner`: turns
a scheduled batch into flat tensors + attention metadata, runs the model, samples.  `load_model` builds one from an
EngineConfig (device, threads, weights, KV cache size, tokenizer).  The simulator's stand-in is disagg/sim/runner.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from disagg.config import EngineConfig, FaultConfig
from disagg.engine.attention import AttentionMetadata, compact_tables, select_backend
from disagg.engine.batch import ScheduledBatch
from disagg.engine.capacity import available_memory, check_kv_capacity, check_memory, kv_blocks
from disagg.engine.faults import NONFINITE_TOKEN, FaultInjector
from disagg.engine.gguf import load_gguf
from disagg.engine.kv_cache import KVCache, bytes_per_block
from disagg.engine.kv_format import KVFormat
from disagg.engine.lora import LoRARuntime
from disagg.engine.mm_inputs import InputEmbeds, step_embeds
from disagg.engine.model import CausalLM, ModelConfig, RotaryEmbedding, can_prepack
from disagg.engine.native_step import build as build_native_step
from disagg.engine.native_step import float_layers
from disagg.engine.quant import (
    BlockKernels,
    QuantConfig,
    QuantFactory,
    QuantKernels,
    QuantLinear,
    check_quantizable,
    gguf_file,
    quant_kernels,
)
from disagg.engine.sampler import logit_scan, logprob_entries, sample
from disagg.engine.sequence import Sequence
from disagg.engine.spec import Verified
from disagg.engine.tokenizer import Tokenizer
from disagg.engine.verify import verify_proposals
from disagg.modes import Activations, KVDtype, Quantization
from disagg.protocol import LoRARef
from disagg_kernels.cpu_quant import BlockFormat

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StepLogits(NamedTuple):
    logits: torch.Tensor  # [rows sampled + tokens proposed, vocab]
    rows: list[int]  # the batch rows sampled this step
    scan: tuple[list[int], list[bool]] | None  # the native step's LogitScan of the logits, where it computed them


class Runner(Protocol):
    """The model behind an engine.  It holds the KV memory (`num_blocks` blocks of the engine's block size) that
    the engine's block pool hands out."""

    @property
    def model_config(self) -> ModelConfig: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def kv_cache(self) -> KVCache | None:
        """The device KV cache (what peers read and tiers copy), or None for a stand-in that holds no KV."""
        ...

    @property
    def last_step_s(self) -> float | None:
        """How long the last `execute` took: measured, or modelled by a stand-in (virtual time); None when a
        stand-in's time is known only when the step ends (its driver then calls `LLMEngine.measure`)."""
        ...

    @property
    def last_logprobs(self) -> dict[int, list]:
        """{batch row: logprob entry} of the last step, for the rows whose request asked for logprobs."""
        ...

    @property
    def last_verified(self) -> dict[int, Verified]:
        """{batch row: how its proposal fared} of the last step, for the rows that carried one."""
        ...

    def load_lora(self, ref: LoRARef) -> None:
        """Have the adapter ready (loaded now if it is not); ValueError naming the problem if it cannot run here."""
        ...

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        """Run one step; returns {batch row: sampled token} for the rows that produce a token (a row whose logits
        were not finite: NONFINITE_TOKEN, which the engine refuses to serve)."""
        ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(config: EngineConfig, kernels: BlockKernels | None = None) -> tuple[ModelRunner, Tokenizer | None]:
    """The real model of config.model (default: the bundled SmolLM2; written back to config.model) on
    config.device, with its KV cache and its tokenizer (None when the directory has none).  `kernels`: the
    quantized matmul (None: the device's, `quant_kernels`)."""
    if not config.model:
        from disagg.model_store import default_model_dir

        config.model = str(default_model_dir())
    model_dir = Path(config.model)
    device = resolve_device(config.device)
    if config.num_threads and device.type == "cpu":
        torch.set_num_threads(config.num_threads)
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = auto if config.dtype == "auto" else _DTYPES[config.dtype]
    mc = ModelConfig.from_dir(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").exists() else None
    kv_format = KVFormat(KVDtype(config.kv_dtype), mc.head_dim, dtype)
    num_blocks = kv_blocks(config, mc, kv_format)
    # before loading weights: a cache that cannot hold one sequence fails fast
    check_kv_capacity(num_blocks, config.block_size, min(config.max_model_len, mc.max_position_embeddings))
    faults = FaultInjector(config.faults) if config.faults is not None else None
    quantization = Quantization(config.quantization)  # validated by EngineConfig
    activations = Activations(config.quant_activations)
    widths = {
        "hidden_size": mc.hidden_size,
        "attention width": mc.num_heads * mc.head_dim,
        "intermediate_size": mc.intermediate_size,
    }
    if quantization is not Quantization.NONE:
        kernels = kernels or quant_kernels(device)
        check_quantizable(quantization, kernels, dtype, widths, activations)
    from_gguf = quantization is Quantization.Q4 and gguf_file(model_dir) is not None
    kv_bytes = num_blocks * bytes_per_block(mc, config.block_size, kv_format)
    check_memory(mc, 1.0 if from_gguf else dtype.itemsize, kv_bytes, device, available_memory())
    runner = ModelRunner(
        model_dir,
        mc,
        num_blocks,
        config.block_size,
        device,
        dtype,
        prepack=config.cpu_prepack,
        faults=faults,
        quantization=quantization,
        kv_format=kv_format,
        kernels=kernels,
        quant_config=QuantConfig(
            activation_bits=activations.bits, panels=config.quant_repack, batch_invariant=kv_format.encoded
        ),
        # a quantized KV cache's rounding magnifies a last-bit difference into another token, so with one every row
        # gets the same bits whatever the step's row count: speculation's verified rows, plain decoding's lone ones,
        # a prompt's rows prefilled whole or after a cached prefix (with speculation off too: a speculating or
        # disaggregated engine's tokens are a plain engine's only if both are).  Float32 weights: the packed GEMM
        # (above); quantized ones: QuantConfig.batch_invariant, and with an int8 cache the native step at every
        # width (native_step.py; a step that carries a LoRA row runs on the torch path, so the rows beside it get
        # that path's bits for that step)
        batch_invariant=kv_format.encoded,
        max_loras=config.max_loras,
    )
    return runner, tokenizer


class ModelRunner:
    def __init__(
        self,
        model_dir: str | Path,
        model_config: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        prepack: bool = True,
        faults: FaultInjector | None = None,
        quantization: Quantization = Quantization.NONE,
        kv_format: KVFormat | None = None,
        kernels: BlockKernels | None = None,
        quant_config: QuantConfig | None = None,
        batch_invariant: bool = False,
        max_loras: int = 0,
    ) -> None:
        self.device, self.dtype, self.block_size = device, dtype, block_size
        # LoRA adapters (engine/lora.py): the layers are wrapped on the first step that uses one
        self.lora = (
            LoRARuntime(max_loras, model_config, device, dtype, in_place=not batch_invariant) if max_loras > 0 else None
        )
        self.model_config, self.num_blocks = model_config, num_blocks
        self.quantization = quantization
        self.kv_format = kv_format or KVFormat(KVDtype.AUTO, model_config.head_dim, dtype)
        self.backend = select_backend(device, self.kv_format)  # the one place the device path is chosen
        with torch.device("meta"):
            model = CausalLM(model_config, self.backend)
        gguf = gguf_file(Path(model_dir)) if quantization is Quantization.Q4 else None
        factory = None
        if quantization is not Quantization.NONE:
            factory = QuantFactory(kernels or quant_kernels(device), quant_config, device=device, dtype=dtype)
        if gguf is not None and factory is not None:  # the file's own blocks: no float32 copy is ever made
            model.rotary = RotaryEmbedding(model_config.head_dim, model_config.rope_theta)
            load_gguf(model, gguf, factory)
        else:
            model = model.to_empty(device=device)
            model.rotary = RotaryEmbedding(model_config.head_dim, model_config.rope_theta).to(device)
            model.load_weights(model_dir)
        self.faults = faults  # injected faults (chaos drills, tests); None: none
        if faults is not None:
            faults.corrupt(model.layers)
        self.model = model.to(device=device, dtype=dtype).eval()  # GGUF norms load on CPU
        self.model.rotary.inv_freq = self.model.rotary.inv_freq.float()
        # a float32 CPU model's own matrices for the native step, taken before prepacking replaces their modules
        raw = float_layers(self.model) if factory is None and device.type == "cpu" else None
        if factory is not None and gguf is None:  # an HF checkpoint rounded to blocks at load
            self.model.quantize(factory, BlockFormat.U8 if quantization is Quantization.INT8 else BlockFormat.Q4_1)
        elif factory is None and prepack and can_prepack(device, dtype):
            self.model.prepack(batch_invariant=batch_invariant)
        if factory is not None and isinstance(self.model.lm_head, QuantLinear):
            self.model.lm_head.config = factory.config.for_head()
        self.kv_cache = KVCache(model_config, num_blocks, block_size, self.kv_format, device)
        # small steps on CPU: the whole stack in one native call (engine/native_step.py)
        config = factory.config if factory is not None else QuantConfig()
        step_kernels = factory.kernels if factory is not None else None  # None: the CPU's, if the step applies
        self.native_step = build_native_step(self.model, self.kv_cache, config, step_kernels, raw)
        # the kernels already loaded (the native step's, or a quantized model's): none built for the scan alone
        loaded = step_kernels.native if isinstance(step_kernels, QuantKernels) else None
        self.scan = logit_scan(self.native_step.native if self.native_step is not None else loaded)
        self.kernel_path = "float" if factory is None else factory.kernels.name
        if self.native_step is not None:
            self.kernel_path += "+stack"
        self.last_logprobs: dict[int, list] = {}  # {batch row: logprob entry} of the last step, rows that asked
        self.last_verified: dict[int, Verified] = {}  # {batch row: its proposal's verification} of the last step
        self.last_step_s = 0.0

    def load_lora(self, ref: LoRARef) -> None:
        if self.lora is None:
            raise ValueError("this worker serves no LoRA adapters (--max-loras 0)")
        self.lora.cache.get(ref, keep=set())

    def set_faults(self, config: FaultConfig | None) -> None:
        """Chaos drills on a running engine: inject `config`'s faults from the next step on (None: none).  A weight
        corruption is applied now and stays until the process restarts, as real corruption would."""
        self.faults = FaultInjector(config) if config is not None else None
        if self.faults is not None:
            self.faults.corrupt(self.model.layers)

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], InputEmbeds | None]:
        """Flat input ids, positions, metadata, the batch rows whose last token yields a next-token sample, and the
        step's image rows (None: no computed position is an image's)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            draft = batch.drafts[row] if batch.drafts else []
            tokens = seq.token_ids + draft if draft else seq.token_ids  # a proposal is verified in this step
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            if end == len(tokens):
                sample_rows.append(row)
        max_blocks = max(len(seq.block_ids) for seq in batch.seqs)
        tables = [seq.block_ids + [0] * (max_blocks - len(seq.block_ids)) for seq in batch.seqs]
        dev = self.device
        # an encoded cache decodes only the blocks the step reads
        gather_ids, compact = (
            compact_tables([s.block_ids for s in batch.seqs], dev) if self.kv_format.encoded else (None, None)
        )
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens_list=seq_lens,
            query_start_list=query_start,
            max_query_len=max(batch.num_new_tokens),
            block_size=bs,
            gather_ids=gather_ids,
            compact_tables=compact,
            verify_rows=frozenset(r for r, draft in enumerate(batch.drafts) if draft) if batch.drafts else frozenset(),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        starts = [seq.num_computed_tokens for seq in batch.seqs]
        embeds = (
            step_embeds([seq.images for seq in batch.seqs], starts, seq_lens, query_start)
            if any(seq.images for seq in batch.seqs)
            else None
        )
        return ids, pos, meta, sample_rows, embeds

    def hidden_states(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        meta: AttentionMetadata,
        seqs: list[Sequence],
        embeds: InputEmbeds | None = None,
    ) -> torch.Tensor:
        """The model's final hidden states for a prepared step: the native step where it takes it, else torch."""
        if self.native_step is not None and self.native_step.takes(len(ids), seqs):
            return self.native_step.forward(ids, pos, meta, embeds)
        if self.lora is not None:
            self.lora.bind(self.model, [seq.lora for seq in seqs], meta.query_start_list)
        return self.model(ids, pos, self.kv_cache.tensor, meta, embeds)

    @torch.inference_mode()
    def compute_logits(self, batch: ScheduledBatch) -> StepLogits:
        """Logits for the rows that complete their known tokens this step: one row of logits each, and for a row
        that carries a proposal (`batch.drafts`), one more per proposed token, the last token's first."""
        ids, pos, meta, sample_rows, embeds = self.prepare(batch)
        last: list[int] = []  # the last position of each sampled row, and each proposed position before it
        for r in sample_rows:
            end = meta.query_start_list[r + 1]
            last.extend(range(end - 1 - (len(batch.drafts[r]) if batch.drafts else 0), end))
        native = self.native_step
        if native is not None and native.holds_head and native.takes(len(ids), batch.seqs):  # step and head at once
            logits, greedy, finite = native.logits(ids, pos, meta, last, embeds)
            return StepLogits(logits, sample_rows, (greedy, finite))
        hidden = self.hidden_states(ids, pos, meta, batch.seqs, embeds)
        return StepLogits(self.model.compute_logits(hidden[last]), sample_rows, None)

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        """Run one step; returns {batch row: sampled token} for rows that produce a token."""
        t0 = time.perf_counter()
        try:
            return self._execute(batch)
        finally:
            if self.faults is not None:
                self.faults.stretch(time.perf_counter() - t0)
            self.last_step_s = time.perf_counter() - t0

    def _execute(self, batch: ScheduledBatch) -> dict[int, int]:
        self.last_logprobs = {}
        self.last_verified = {}
        logits, rows, scanned = self.compute_logits(batch)
        if not rows:
            return {}
        if self.faults is not None:  # an injected fault may change the logits: scanned again below
            logits, scanned = self.faults.logits(logits), None
        greedy, finite = scanned or self.scan(logits)  # per logits row, one pass over it
        out: dict[int, int] = {}
        if batch.drafts and any(batch.drafts[r] for r in rows):
            keep, rows = verify_proposals(batch, rows, logits, (greedy, finite), out, self.last_verified)
            if not rows:
                return out
            logits, greedy, finite = logits[keep], [greedy[k] for k in keep], [finite[k] for k in keep]
        if not all(finite):  # sample only the sound rows; the others yield NONFINITE_TOKEN
            logits = torch.where(torch.tensor(finite, device=logits.device)[:, None], logits, 0.0)
        seqs = [batch.seqs[r] for r in rows]
        params = [s.sampling for s in seqs]
        tokens = sample(logits, params, [s.num_tokens - s.num_prompt_tokens for s in seqs], greedy=greedy)
        entries = logprob_entries(logits, tokens, params)
        self.last_logprobs = {r: e for r, e in zip(rows, entries) if e is not None}
        out.update({r: t if ok else NONFINITE_TOKEN for r, t, ok in zip(rows, tokens, finite)})
        return out
