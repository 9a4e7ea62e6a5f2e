"""CPU tier memory: host-memory block slots in the device cache's block-major layout.

One tensor [slots, layers, 2, block_size, kv_heads, head_dim] (pinned on CUDA hosts), registered with the
worker's NIXL agent by the worker so peers can READ slots directly.  A slot is in one of three states:

    free       on the free list
    writing    reserved for a store whose copy has not completed: not in the tier index, invisible to lookups
    committed  holds a block's KV; the tier index (kv/tier_index.py) maps its hash to the slot
    (any committed slot may also be referenced: read by a load, a peer or a demotion; never freed then)

Memory and slot bookkeeping only; which hash lives where, and what to store, evict and demote, is the tier
index's and the TieredStore's.
"""

from __future__ import annotations

import torch


class CpuTier:
    def __init__(
        self, num_slots: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool = False
    ) -> None:
        if num_slots <= 0:
            raise ValueError("the CPU tier needs at least one slot")
        self.num_slots = num_slots
        self.tensor = torch.zeros((num_slots, *block_shape), dtype=dtype, pin_memory=pin_memory)
        self.block_bytes = self.tensor[0].numel() * self.tensor.element_size()
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._refs: dict[int, int] = {}  # slot -> references (loads, peer reads, demotions in flight)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_referenced(self, slot: int) -> bool:
        return self._refs.get(slot, 0) > 0

    def reserve(self) -> int | None:
        """A free slot for a store (None if none is free)."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        """A slot's block left the tier (or its store was a duplicate): free it."""
        if self.is_referenced(slot):
            raise RuntimeError(f"freeing CPU slot {slot} while it is being read")
        self._free.append(slot)

    def ref(self, slot: int) -> None:
        self._refs[slot] = self._refs.get(slot, 0) + 1

    def unref(self, slot: int) -> None:
        left = self._refs[slot] - 1
        if left:
            self._refs[slot] = left
        else:
            del self._refs[slot]
