"""Encoder workers, the E of E/PD: Ray actors that turn a request's images into embedding rows (a VLM's vision
tower and projector: disagg/vision/encoder.py), with a cache by content hash, so prefill workers spend their steps
on prefill.  The router reaches them through `RayEncoderPort` (the stage's EncoderPort: disagg/vision/stage.py).

Lifecycle: started by LocalCluster with the model's directory (restarted by Ray with it, max_task_retries=0 so a
call in flight when it dies fails at once: the stage encodes that request colocated); `encode` runs on one thread
of its own, so the actor keeps answering `ready` and `pid` while it works.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import ray

from disagg.errors import WorkerLost
from disagg.protocol import EncodeBatch

if TYPE_CHECKING:
    from disagg.vision.encoder import VisionEncoder


@ray.remote(num_cpus=0, max_task_retries=0)
class EncoderWorker:
    def __init__(self, model_dir: str, cache_bytes: int, num_threads: int) -> None:
        import torch  # in the encoder's process only: the router's loads no torch

        from disagg.vision.encoder import VisionEncoder

        torch.set_num_threads(num_threads)
        self.encoder = VisionEncoder(model_dir, cache_bytes)
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    async def encode(self, batch: bytes) -> bytes:
        images = EncodeBatch.from_wire(batch)
        return await asyncio.get_running_loop().run_in_executor(self._exec, encode_batch, self.encoder, images)


def encode_batch(encoder: VisionEncoder, batch: EncodeBatch) -> bytes:
    """The batch's images with their rows (their bytes dropped), on the wire: what an encoder worker answers, and
    a prefill worker that encodes for the others (`--encode-on-prefill`: cluster/actors.py)."""
    from disagg.vision.encoder import rows_to_bytes

    rows = encoder.encode([(image.content_hash, image.data) for image in batch.images])
    out = [dataclasses.replace(image, data=b"", embedding=rows_to_bytes(r)) for image, r in zip(batch.images, rows)]
    return EncodeBatch(out).to_wire()


class RayEncoderPort:
    """An encoder worker as the stage's EncoderPort: Ray's failures become WorkerLost."""

    def __init__(self, name: str, actor: Any) -> None:
        self.name, self.actor = name, actor

    async def encode(self, batch: bytes) -> bytes:
        try:
            return await self.actor.encode.remote(batch)
        except ray.exceptions.RayError as exc:
            raise WorkerLost(f"encoder {self.name}: {type(exc).__name__}") from None
