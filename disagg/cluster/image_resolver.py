"""A worker's side of a request's images: their embedding rows, from what the router attached (an encoder worker
ran them: E/PD) or from the worker's own encoder (colocated), built on the first image it has to encode."""

from __future__ import annotations

from pathlib import Path

from disagg.engine.mm_inputs import ImageEmbedding
from disagg.protocol import Request
from disagg.vision.encoder import VisionEncoder, rows_from_bytes
from disagg.vision.spec import VisionSpec


class ImageResolver:
    def __init__(self, model_dir: str | Path, spec: VisionSpec, cache_bytes: int) -> None:
        self.model_dir, self.spec, self.cache_bytes = model_dir, spec, cache_bytes
        self._encoder: VisionEncoder | None = None
        self.received = 0  # images whose rows came with the request
        self.encoded = 0  # images this worker encoded (or found in its encoder's cache)

    @classmethod
    def for_model(cls, model_dir: str | Path, cache_bytes: int) -> ImageResolver | None:
        """None for a text-only model."""
        spec = VisionSpec.from_dir(model_dir)
        return None if spec is None else cls(model_dir, spec, cache_bytes)

    @property
    def encoder(self) -> VisionEncoder:
        if self._encoder is None:
            self._encoder = VisionEncoder(self.model_dir, self.cache_bytes)
        return self._encoder

    def resolve(self, request: Request) -> list[ImageEmbedding]:
        """The request's images with their rows; ValueError (a 400 upstream) for rows of the wrong shape."""
        hidden = self.spec.hidden_size
        out: dict[int, ImageEmbedding] = {}
        todo = []
        for i, image in enumerate(request.images):
            if image.embedding:
                rows = rows_from_bytes(image.embedding, image.num_tokens, hidden)
                out[i] = ImageEmbedding(image.content_hash, image.offset, rows)
                self.received += 1
            elif image.data:
                todo.append(i)
            else:
                raise ValueError(f"image {image.content_hash} came with neither its bytes nor its embedding")
        if todo:
            encoded = self.encoder.encode([(request.images[i].content_hash, request.images[i].data) for i in todo])
            for i, rows in zip(todo, encoded):
                out[i] = ImageEmbedding(request.images[i].content_hash, request.images[i].offset, rows)
            self.encoded += len(todo)
        return [out[i] for i in range(len(request.images))]
