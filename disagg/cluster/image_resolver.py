"""A worker's side of a request's images: their embedding rows, from what the router attached (an encoder worker
ran them: E/PD) or from the worker's own encoder (colocated, or a fallback), loaded when the worker starts so that
no request waits seconds for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from disagg.engine.mm_inputs import ImageEmbedding
from disagg.protocol import ImageInput, Request
from disagg.vision.encoder import VisionEncoder, rows_from_bytes
from disagg.vision.spec import VisionSpec


class ImageResolver:
    def __init__(self, encoder: VisionEncoder) -> None:
        self.encoder, self.spec = encoder, encoder.spec
        self.received = 0  # images whose rows came with the request
        self.encoded = 0  # images this worker encoded (or found in its encoder's cache)
        self.encoded_as_encoder = 0  # images the router sent to its `encode` (cluster/actors.py), whoever prefills them

    @classmethod
    def for_model(cls, model_dir: str | Path, cache_bytes: int) -> ImageResolver | None:
        """None for a text-only model."""
        return cls(VisionEncoder(model_dir, cache_bytes)) if VisionSpec.from_dir(model_dir) is not None else None

    def resolve(self, request: Request, *, lazy: bool = False) -> list[ImageEmbedding]:
        """The request's images with their rows; ValueError (a 400 upstream) for rows of the wrong shape.  `lazy`:
        images to encode here are encoded only if a step computes their positions (a decode worker handed a whole
        prefill: otherwise the image would be encoded twice on the request's first token's path)."""
        hidden = self.spec.hidden_size
        out: dict[int, ImageEmbedding] = {}
        todo = []
        for i, image in enumerate(request.images):
            if image.embedding:
                rows = rows_from_bytes(image, hidden)
                out[i] = ImageEmbedding.of(image.content_hash, image.offset, rows)
                self.received += 1
            elif not image.data:
                raise ValueError(f"image {image.content_hash} came with neither its bytes nor its embedding")
            elif lazy:
                out[i] = ImageEmbedding(image.content_hash, image.offset, image.num_tokens, self._later(image))
            else:
                todo.append(i)
        if todo:
            encoded = self.encoder.encode([(request.images[i].content_hash, request.images[i].data) for i in todo])
            for i, rows in zip(todo, encoded):
                out[i] = ImageEmbedding.of(request.images[i].content_hash, request.images[i].offset, rows)
            self.encoded += len(todo)
        return [out[i] for i in range(len(request.images))]

    def _later(self, image: ImageInput) -> Callable[[], torch.Tensor]:
        def encode() -> torch.Tensor:
            self.encoded += 1
            return self.encoder.encode([(image.content_hash, image.data)])[0]

        return encode
