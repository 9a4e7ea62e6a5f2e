"""Image embeddings in the engine: which prompt positions take an embedding row instead of a token's embedding.

A request's image occupies `len(rows)` prompt positions from `offset`, whose token ids are its placeholder ids
(disagg/vision/images.py: above the vocabulary, derived from the image's content hash).  A step that computes any of
those positions swaps the token embedding for the image's row, as HF's LLaVA scatters image features into
`inputs_embeds`; positions served from the prefix cache are not computed at all, which is why a repeated image
costs neither its encoder nor its prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from disagg.vision.images import placeholder_ids


@dataclass(eq=False)
class ImageEmbedding:
    """One image of a request: its content hash, its first prompt position and length, and its embedding rows
    [num_tokens, hidden] - or what makes them on first use: a decode worker handed a finished prefill needs them
    only if it recomputes the prompt (a failed KV read, a preemption), so it does not encode the image up front."""

    content_hash: str
    offset: int
    num_tokens: int
    source: torch.Tensor | Callable[[], torch.Tensor]

    @classmethod
    def of(cls, content_hash: str, offset: int, rows: torch.Tensor) -> ImageEmbedding:
        return cls(content_hash, offset, int(rows.shape[0]), rows)

    @property
    def rows(self) -> torch.Tensor:
        if not isinstance(self.source, torch.Tensor):
            self.source = self.source()
            if tuple(self.source.shape[:1]) != (self.num_tokens,):
                raise ValueError(f"image {self.content_hash} was encoded into {self.source.shape[0]} rows")
        return self.source


@dataclass(frozen=True)
class InputEmbeds:
    """Rows of a step's flattened input that are embeddings (`index` [k] into the step's tokens, `values` [k, H])."""

    index: torch.Tensor
    values: torch.Tensor


def text_ids(prompt: list[int], images: Seq[ImageEmbedding], vocab_size: int, hidden_size: int) -> list[int]:
    """The prompt's ids outside its images (for the intake's own check of token ids); ValueError unless each image's
    span lies in the prompt, holds exactly its placeholder ids and has one row of the model's width per position."""
    text: list[int] = []
    last_end = 0
    for image in sorted(images, key=lambda i: i.offset):
        n, end = image.num_tokens, image.offset + image.num_tokens
        rows = image.source
        if isinstance(rows, torch.Tensor) and (rows.dim() != 2 or tuple(rows.shape) != (n, hidden_size)):
            raise ValueError(f"an image embedding must be [{n}, {hidden_size}], not {list(rows.shape)}")
        if image.offset < last_end or end > len(prompt):
            raise ValueError("image spans must lie in the prompt without overlapping")
        if prompt[image.offset : end] != placeholder_ids(image.content_hash, n, vocab_size):
            raise ValueError(f"the prompt's positions {image.offset}..{end} are not image {image.content_hash}'s")
        text += prompt[last_end : image.offset]
        last_end = end
    return text + prompt[last_end:]


def step_embeds(
    images_per_row: Seq[Seq[ImageEmbedding]], starts: Seq[int], ends: Seq[int], query_start: Seq[int]
) -> InputEmbeds | None:
    """The step's image rows: for batch row r computing positions [starts[r], ends[r]) at flat offset
    query_start[r], every position an image of that row covers.  None when no computed position is an image's."""
    index: list[int] = []
    values: list[torch.Tensor] = []
    for images, start, end, base in zip(images_per_row, starts, ends, query_start):
        for image in images:
            lo, hi = max(start, image.offset), min(end, image.offset + image.num_tokens)
            if lo < hi:
                index.extend(range(base + lo - start, base + hi - start))
                values.append(image.rows[lo - image.offset : hi - image.offset])
    if not index:
        return None
    return InputEmbeds(torch.tensor(index, dtype=torch.int64), torch.cat(values))


def embed_inputs(embedding: torch.nn.Embedding, ids: torch.Tensor, embeds: InputEmbeds | None) -> torch.Tensor:
    """Token embeddings of a step's ids, image rows swapped in where `embeds` says (placeholder ids are above the
    vocabulary, so they are clamped before the lookup and their rows overwritten)."""
    if embeds is None:
        return embedding(ids)
    x = embedding(ids.clamp(max=embedding.num_embeddings - 1))
    x[embeds.index.to(x.device)] = embeds.values.to(device=x.device, dtype=x.dtype)
    return x
