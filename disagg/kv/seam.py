"""The engine's objects as the KV side sees them: structural types (Protocols) for the block pool and a sequence,
so disagg/kv types what it uses of disagg/engine without importing it (the dependency runs engine -> kv only).

disagg/engine/block_pool.py's BlockPool and disagg/engine/sequence.py's Sequence satisfy them; so does any
stand-in a test builds.
"""

from __future__ import annotations

from typing import Protocol

from disagg.protocol import PrefillResult


class BlockPool(Protocol):
    """Device blocks with reference counts and a prefix cache by chained block hash."""

    @property
    def num_free_blocks(self) -> int: ...

    def lookup_prefix(self, block_hashes: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of `block_hashes`."""
        ...

    def allocate(self, n: int) -> list[int]: ...

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (so they cannot be evicted or reused)."""
        ...

    def free(self, block_ids: list[int]) -> None: ...

    def cache_blocks(self, block_ids: list[int], block_hashes: list[int], parent_hash: int | None) -> None: ...


class Sequence(Protocol):
    """One request inside an engine, as far as loading, leasing and pinning its KV goes."""

    request_id: str
    block_ids: list[int]
    block_hashes: list[int]  # chained hashes of its full blocks (see update_block_hashes)
    num_registered_blocks: int  # leading blocks already in the prefix cache
    remote: PrefillResult | None  # another worker's KV for this prompt, read before computing
    tier_load_failed: bool
    hold_kv: bool  # lease the blocks for a reader when finished
    session_id: str | None
    kv_retention_s: float | None
    tenant: str | None  # namespaces the session's pin

    @property
    def num_tokens(self) -> int: ...

    def update_block_hashes(self) -> None: ...
