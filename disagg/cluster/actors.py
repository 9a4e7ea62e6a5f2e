"""Ray actor classes for the engine workers: one engine per actor (its role fixed by the class, so `ps` shows
`ray::PrefillWorker` / `ray::DecodeWorker`).  The router actor lives in cluster/router_actor.py, apart from these:
Ray imports an actor's module in its process, and the router's must not load the engine (torch).

Restarts are Ray's: every actor is created with max_restarts (see launch.py) and max_task_retries=0, so a call
in flight when a process dies fails at once (the router migrates the request) and Ray brings the actor back
with the same constructor arguments - a worker as a new incarnation that the router's supervisor wires back in,
the router on the same port.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import ray

from disagg.cluster.encoder import encode_batch
from disagg.cluster.worker import EngineWorker, WorkerConfig
from disagg.errors import InvalidRequest
from disagg.protocol import EncodeBatch, Role


class _RoleWorker(EngineWorker):
    ROLE = Role.BOTH

    def __init__(self, config: bytes) -> None:
        """`config`: a WorkerConfig message (small and inline, so Ray restarts the actor with it); the class fixes
        the role."""
        super().__init__(dataclasses.replace(WorkerConfig.from_wire(config), role=self.ROLE))
        self.node_id = ray.get_runtime_context().get_node_id()
        self._encode_exec: ThreadPoolExecutor | None = None

    async def encode(self, batch: bytes) -> bytes:
        """An encoder worker's `encode`, for a prefill worker that encodes for every prefill worker
        (`--encode-on-prefill`; the router chooses the encoder before the prefill worker): on a thread of its own,
        not the engine's, so this worker's steps go on meanwhile; its own encoder and cache."""
        if self.images is None:
            raise InvalidRequest(f"worker {self.config.name} serves no vision-language model")
        if self._encode_exec is None:
            self._encode_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        images = EncodeBatch.from_wire(batch)
        answer = await asyncio.get_running_loop().run_in_executor(
            self._encode_exec, encode_batch, self.images.encoder, images
        )
        self.images.encoded_as_encoder += len(images.images)
        return answer


# num_cpus=0: the engines size their own torch thread pools; Ray's CPU accounting would only serialize them.
@ray.remote(num_cpus=0, max_task_retries=0)
class PrefillWorker(_RoleWorker):
    ROLE = Role.PREFILL


@ray.remote(num_cpus=0, max_task_retries=0)
class DecodeWorker(_RoleWorker):
    ROLE = Role.DECODE


@ray.remote(num_cpus=0, max_task_retries=0)
class AggregatedWorker(_RoleWorker):
    ROLE = Role.BOTH
