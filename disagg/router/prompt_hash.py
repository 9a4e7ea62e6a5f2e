"""The router's prompt hashing: `disagg/protocol.py`'s `hash_prompt_blocks` (the reference every worker uses), or
the same chain computed in one C++ call (`disagg_kernels/block_hash.cpp`), which the router takes where its C++
library builds.  Both give the same hashes bit for bit (tests/test_router_scale.py compares them on random
prompts, salts and block sizes); a prompt the C++ call cannot take (a token id outside int32) goes to the
reference, which rejects it as it always has.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Sequence

from disagg.protocol import ROOT_PARENT, hash_prompt_blocks
from disagg.router.native_table import library
from disagg_kernels.prefix_index import IndexLib

PromptHasher = Callable[[Sequence[int], int, "int | None"], list[int]]  # (token ids, block size, parent) -> hashes


class NativePromptHasher:
    def __init__(self, lib: IndexLib) -> None:
        self._chain = lib.chain

    def __call__(self, token_ids: Sequence[int], block_size: int, parent_hash: int | None = None) -> list[int]:
        if block_size <= 0:
            return hash_prompt_blocks(token_ids, block_size, parent_hash)  # (which refuses it)
        blocks = len(token_ids) // block_size
        n = blocks * block_size
        try:  # the token ids as the reference packs them
            root = ROOT_PARENT if parent_hash is None else parent_hash.to_bytes(8, "little")
            tokens = struct.pack(f"<{n}i", *token_ids[:n])
        except (struct.error, OverflowError, TypeError):  # not int32 ids, or a parent outside uint64: the reference
            return hash_prompt_blocks(token_ids, block_size, parent_hash)  # decides (it refuses them)
        if not blocks:
            return []
        out = array("Q", bytes(8 * blocks))
        self._chain(root, len(root), tokens, blocks, block_size, out.buffer_info()[0])
        return out.tolist()


def make_prompt_hasher(native: bool) -> PromptHasher:
    """The C++ chain when asked for and the router's library builds here, else the reference."""
    lib = library() if native else None
    return NativePromptHasher(lib) if lib is not None else hash_prompt_blocks
