"""hash_id -> token ids, deterministically: the same id gives the same tokens in every process and run, so
requests that share leading hash_ids share a token prefix (and hence KV blocks) exactly as the trace says."""

from __future__ import annotations

import hashlib
import random

from disagg.utils import cdiv

_SPECIAL_TOKENS = 256  # low ids of most vocabularies are special/control tokens: keep prompts clear of them


def token_range(vocab_size: int) -> tuple[int, int]:
    if vocab_size < 2:
        raise ValueError("vocab_size must be >= 2")
    return min(_SPECIAL_TOKENS, vocab_size // 2), vocab_size


def block_tokens(hash_id: int, n: int, vocab_size: int) -> list[int]:
    """The n tokens of block `hash_id` (a seeded PRNG keyed by the id; stable across Python versions)."""
    lo, hi = token_range(vocab_size)
    seed = int.from_bytes(
        hashlib.blake2b(hash_id.to_bytes(16, "little", signed=True), digest_size=8).digest(), "little"
    )
    rng = random.Random(seed)
    return [rng.randrange(lo, hi) for _ in range(n)]


def prompt_tokens(hash_ids: list[int], length: int, per_block: int, vocab_size: int, salt: int = 0) -> list[int]:
    """Concatenated block tokens cut to `length` (the last block is partial when length is not a multiple).

    Without hash_ids (e.g. CSV traces) the prompt is unique to `salt` (use the row number): no shared prefix.
    """
    if length <= 0:
        raise ValueError("prompt length must be positive")
    if not hash_ids:
        rng = random.Random(f"unique-{salt}")
        lo, hi = token_range(vocab_size)
        return [rng.randrange(lo, hi) for _ in range(length)]
    if length > len(hash_ids) * per_block:
        raise ValueError(f"{len(hash_ids)} blocks of {per_block} tokens cannot hold a {length}-token prompt")
    out: list[int] = []
    for h in hash_ids[: cdiv(length, per_block)]:
        out.extend(block_tokens(h, per_block, vocab_size))
    return out[:length]
