"""Model runner: turns a scheduled batch into flat tensors + attention metadata, runs the model, samples."""

from __future__ import annotations

from pathlib import Path

import torch

from disagg.engine.attention import AttentionMetadata, select_backend
from disagg.engine.kv_cache import KVCache
from disagg.engine.model import CausalLM, ModelConfig, RotaryEmbedding, can_prepack
from disagg.engine.sampler import logprob_entries, sample
from disagg.engine.scheduler import ScheduledBatch


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
    ) -> None:
        self.device, self.dtype, self.block_size = device, dtype, block_size
        self.backend = select_backend(device)  # the one place the device path is chosen
        with torch.device("meta"):
            model = CausalLM(model_config, self.backend)
        model = model.to_empty(device=device)
        model.rotary = RotaryEmbedding(model_config.head_dim, model_config.rope_theta).to(device)
        model.load_weights(model_dir)
        self.model = model.to(dtype).eval()
        self.model.rotary.inv_freq = self.model.rotary.inv_freq.float()
        if prepack and can_prepack(device, dtype):
            self.model.prepack()
        self.kv_cache = KVCache(model_config, num_blocks, block_size, dtype, device)
        self.last_logprobs: dict[int, list] = {}  # {batch row: logprob entry} of the last step, rows that asked

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat input ids, positions, metadata, and the batch rows whose last token yields a next-token sample."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(row)
        max_blocks = max(len(seq.block_ids) for seq in batch.seqs)
        tables = [seq.block_ids + [0] * (max_blocks - len(seq.block_ids)) for seq in batch.seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens_list=seq_lens,
            query_start_list=query_start,
            max_query_len=max(batch.num_new_tokens),
            block_size=bs,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, meta, sample_rows

    @torch.inference_mode()
    def compute_logits(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Logits [len(sample_rows), vocab] for the rows that complete their known tokens this step."""
        ids, pos, meta, sample_rows = self.prepare(batch)
        hidden = self.model(ids, pos, self.kv_cache.tensor, meta)
        last = [meta.query_start_list[r + 1] - 1 for r in sample_rows]
        return self.model.compute_logits(hidden[last]), sample_rows

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        """Run one step; returns {batch row: sampled token} for rows that produce a token."""
        self.last_logprobs = {}
        logits, rows = self.compute_logits(batch)
        if not rows:
            return {}
        seqs = [batch.seqs[r] for r in rows]
        params = [s.sampling for s in seqs]
        tokens = sample(logits, params, [s.num_tokens - s.num_prompt_tokens for s in seqs])
        entries = logprob_entries(logits, tokens, params)
        self.last_logprobs = {r: e for r, e in zip(rows, entries) if e is not None}
        return dict(zip(rows, tokens))
