"""One step's work as the scheduler hands it to the runner: the rows (sequences) with their token counts and
proposals, kept as parallel lists in row order, plus what the step preempted or imported."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    imported: list[Sequence] = field(default_factory=list)  # a peer's prefill landed: emit its first token
    # per row, the proposed tokens verified after its last token this step (speculative decoding; engine/spec.py)
    drafts: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def order_by_adapter(self) -> None:
        """Rows regrouped (stably) by LoRA adapter, in adapter-key order, the base model's rows last: each adapter's
        tokens are then one contiguous run, which lets the adapted layers skip their gathers (engine/lora.py).  The
        row lists move together, so the step's outputs still map row by row to `seqs`."""
        order = sorted(range(len(self.seqs)), key=lambda i: adapter_order(self.seqs[i]))
        self.seqs = [self.seqs[i] for i in order]
        self.num_new_tokens = [self.num_new_tokens[i] for i in order]
        if self.drafts:
            self.drafts = [self.drafts[i] for i in order]

    def attention_kpairs(self) -> float:
        """Query x key pairs this step's attention computes, in thousands (before the step moves the sequences'
        computed counts on): the cost term that grows with context, beside the token and sequence counts."""
        return sum(n * (seq.num_computed_tokens + n) for seq, n in zip(self.seqs, self.num_new_tokens)) / 1000


def adapter_order(seq: Sequence) -> tuple[bool, tuple[str, str, str]]:
    return (True, ("", "", "")) if seq.lora is None else (False, seq.lora.key())
