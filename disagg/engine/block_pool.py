"""Fixed-size KV blocks: free list, ref counts, prefix cache by chained block hash, LRU eviction, KV events.

A block is in exactly one of three states:
  * in use      ref_count > 0 (held by one or more sequences; shared prefix blocks have ref_count > 1)
  * cached-free ref_count == 0 and has a hash: reusable by a later prefix hit, evicted LRU when space is needed
  * empty-free  ref_count == 0 and no hash
Free blocks (both kinds) sit in one ordered queue; empty ones go to the front so they are reused before any
cached block is evicted.  Every change to the set of cached hashes is recorded as a KVEvent for the router.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from disagg.protocol import EventKind, KVEvent


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._events: list[KVEvent] = []

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def lookup_prefix(self, block_hashes: list[int]) -> list[int]:
        """Block ids of the longest prefix of `block_hashes` that is cached (in use or cached-free)."""
        hits: list[int] = []
        if not self.enable_caching:
            return hits
        for h in block_hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cached_hashes(self) -> list[int]:
        return list(self._cached)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    # ------------------------------------------------------------------ mutations
    def allocate(self, n: int) -> list[int]:
        """Take n blocks off the free queue (evicting cached content LRU-first); each gets ref_count 1."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"need {n} blocks, {len(self._free)} free")
        ids = []
        evicted: list[int] = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                evicted.append(block.block_hash)
                block.block_hash = None
            block.ref_count = 1
            ids.append(block_id)
        if evicted:
            self._events.append(KVEvent(kind=EventKind.REMOVED, block_hashes=evicted))
        return ids

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks found by `lookup_prefix` (pulling cached-free ones out of the queue)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block. Freed in reverse so a sequence's tail is evicted before its head."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)

    def cache_blocks(self, block_ids: list[int], block_hashes: list[int], parent_hash: int | None) -> None:
        """Register full, computed blocks under their chained hashes so later requests can reuse them."""
        if not self.enable_caching:
            return
        run: list[int] = []  # consecutive newly stored hashes: one event each, so every event has its true parent
        run_parent: int | None = None
        for i, (block_id, h) in enumerate(zip(block_ids, block_hashes)):
            block = self.blocks[block_id]
            # Skip blocks already cached (a prefix hit) and content computed twice concurrently (first copy wins).
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = block_id
                if not run:
                    run_parent = parent_hash if i == 0 else block_hashes[i - 1]
                run.append(h)
            elif run:
                self._events.append(KVEvent(kind=EventKind.STORED, block_hashes=run, parent_hash=run_parent))
                run = []
        if run:
            self._events.append(KVEvent(kind=EventKind.STORED, block_hashes=run, parent_hash=run_parent))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached-free block. Refused (False) while any block is in use, as in vLLM."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        self._events.append(KVEvent(kind=EventKind.CLEARED, block_hashes=[]))
        return True

    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events
