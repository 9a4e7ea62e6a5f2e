"""The encoder stage of E/PD: which requests' images an encoder worker encodes, and attaching its embedding rows
to the request before the routing core sends it to prefill.

Lifecycle of a request with images (SGLang's and Dynamo's E/PD, made conditional as our remote prefill is):
1. The front door has read the images (vision/images.py) and put their placeholder ids in the prompt.
2. `EncodeStage.attach` decides: images taking at least `remote_min_image_tokens` prompt positions go to the
   least busy encoder worker with a free slot; fewer (image-light), or every encoder at `max_inflight_per_encoder`,
   stay with the request (COLOCATED: its prefill worker encodes them on its own thread, from its own cache).
3. The encoder answers the rows (ENCODER); the request then carries rows, not image bytes, to prefill and decode
   and through any migration.  An encoder that fails, times out or answers garbage leaves the bytes in place
   (FALLBACK: encoded colocated), so a fault costs time, never the request.
Pure: the encoder workers are reached through `EncoderPort`s (Ray's: cluster/encoder.py; a fake in tests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from disagg.errors import DisaggError
from disagg.protocol import EncodeBatch, Request

log = logging.getLogger(__name__)


@dataclass
class EncodeConfig:
    remote_min_image_tokens: int = field(
        default=1,
        metadata={
            "help": "a request whose images fill at least this many prompt positions is encoded on an encoder "
            "worker (E/PD); fewer: by its prefill worker (colocated)"
        },
    )
    max_inflight_per_encoder: int = field(
        default=2,
        metadata={"help": "requests an encoder worker encodes at once; all encoders full: encoded colocated"},
    )
    timeout_s: float = field(
        default=30.0,
        metadata={"help": "an encoder's answer at most (seconds); later: the images are encoded colocated"},
    )


class EncoderPort(Protocol):
    async def encode(self, batch: bytes) -> bytes:
        """An EncodeBatch in (the images' bytes), the same images out with their rows; DisaggError on failure."""
        ...


class Encoded(enum.Enum):
    NONE = "none"  # the request has no images
    ENCODER = "encoder"  # an encoder worker's rows are attached
    COLOCATED = "colocated"  # left to the prefill worker by the rule (image-light, or every encoder busy)
    FALLBACK = "fallback"  # an encoder failed: left to the prefill worker


class EncodeStage:
    def __init__(
        self,
        ports: Mapping[str, EncoderPort],
        hidden_size: int,
        config: EncodeConfig,
        usable: Callable[[str], bool] = lambda name: True,
    ) -> None:
        """`usable`: whether an encoder may be given images now (a prefill worker that encodes too is not while the
        router's health monitor has it dead: its requests would wait `timeout_s` for nothing)."""
        self.ports, self.hidden_size, self.config, self.usable = dict(ports), hidden_size, config, usable
        self.inflight = dict.fromkeys(self.ports, 0)

    def _release(self, name: str, call: asyncio.Future) -> None:
        self.inflight[name] -= 1
        if not call.cancelled():
            call.exception()  # seen here: a failure after its request stopped waiting is not an unretrieved error

    def choose(self, request: Request) -> str | None:
        """The encoder for this request's images; None: encode colocated."""
        tokens = sum(image.num_tokens for image in request.images)
        if not self.ports or tokens < max(1, self.config.remote_min_image_tokens):
            return None
        candidates = [n for n in self.inflight if self.usable(n)]
        name = min(candidates, key=self.inflight.__getitem__, default=None)
        return name if name is not None and self.inflight[name] < self.config.max_inflight_per_encoder else None

    async def attach(self, request: Request) -> Encoded:
        """Attach the images' rows from an encoder worker when the rule says so; how they will be encoded."""
        if not request.images:
            return Encoded.NONE
        name = self.choose(request)
        if name is None:
            return Encoded.COLOCATED
        sent = EncodeBatch([image for image in request.images if not image.embedding])
        self.inflight[name] += 1
        call = asyncio.ensure_future(self.ports[name].encode(sent.to_wire()))
        # the slot frees when the encoder is done, not when this request stops waiting: a wedged encoder keeps its
        # slots full and gets no more work until it answers
        call.add_done_callback(lambda done: self._release(name, done))
        try:
            answer = await asyncio.wait_for(asyncio.shield(call), self.config.timeout_s)
            rows = EncodeBatch.from_wire(answer).images
        except (DisaggError, asyncio.TimeoutError) as exc:  # WireFormatError is a DisaggError
            log.warning("encoder %s failed (%r): %s's images are encoded colocated", name, exc, request.request_id)
            return Encoded.FALLBACK
        by_hash = {image.content_hash: image.embedding for image in rows}
        if any(len(by_hash.get(i.content_hash, b"")) != i.embedding_bytes(self.hidden_size) for i in sent.images):
            log.warning("encoder %s answered rows of the wrong size: encoded colocated", name)
            return Encoded.FALLBACK
        request.images = [
            image if image.embedding else dataclasses.replace(image, embedding=by_hash[image.content_hash], data=b"")
            for image in request.images
        ]
        return Encoded.ENCODER
