"""Small arithmetic shared across the runtime, so each rule has one definition."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling division of integers (blocks holding `a` tokens at `b` per block), exact for any size (no floats)."""
    return -(-a // b)
