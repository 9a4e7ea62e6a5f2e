"""CPU tier: host-memory block slots in the device cache's block-major layout, indexed by block hash.

One tensor [slots, layers, 2, block_size, kv_heads, head_dim] (pinned on CUDA hosts), registered with the
worker's NIXL agent by the worker so peers can READ slots directly.  A slot is in one of four states:

    free       on the free list
    writing    reserved for a store whose copy has not completed: invisible to lookups
    committed  holds a block's KV under its hash: in the LRU index, visible to lookups
    (any committed slot may also be referenced: read by a load, a peer or a demotion; never evicted then)

Pure bookkeeping plus the tensor; the TieredStore decides what to store, evict and demote.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

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
        self._index: OrderedDict[int, int] = OrderedDict()  # hash -> slot, least recently used first
        self._refs: dict[int, int] = {}  # slot -> references (loads, peer reads, demotions in flight)

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_committed(self) -> int:
        return len(self._index)

    def slot_of(self, block_hash: int) -> int | None:
        return self._index.get(block_hash)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._index

    def hashes(self) -> list[int]:
        return list(self._index)

    def is_referenced(self, slot: int) -> bool:
        return self._refs.get(slot, 0) > 0

    # ------------------------------------------------------------------ mutations
    def reserve(self) -> int | None:
        """A free slot for a store (None if none is free)."""
        return self._free.pop() if self._free else None

    def commit(self, block_hash: int, slot: int) -> bool:
        """The store into `slot` completed: make it visible. False (slot freed) if the hash is already here."""
        if block_hash in self._index:
            self._free.append(slot)
            return False
        self._index[block_hash] = slot
        return True

    def touch(self, block_hash: int) -> None:
        if block_hash in self._index:
            self._index.move_to_end(block_hash)

    def ref(self, slot: int) -> None:
        self._refs[slot] = self._refs.get(slot, 0) + 1

    def unref(self, slot: int) -> None:
        left = self._refs[slot] - 1
        if left:
            self._refs[slot] = left
        else:
            del self._refs[slot]

    def victims(self, n: int, keep: Callable[[int], bool]) -> list[int]:
        """Up to n least-recently-used hashes that may leave: not referenced and not kept (pinned / demoting)."""
        out: list[int] = []
        for h, slot in self._index.items():
            if len(out) >= n:
                break
            if not self.is_referenced(slot) and not keep(h):
                out.append(h)
        return out

    def drop(self, block_hash: int) -> None:
        """Forget a committed, unreferenced block and free its slot."""
        slot = self._index.pop(block_hash)
        if self.is_referenced(slot):
            raise RuntimeError(f"dropping CPU slot {slot} while it is being read")
        self._free.append(slot)
