"""Block copies between two block-major KV tensors (device cache <-> CPU tier), off the caller's thread.

Both tensors are [blocks, ...] with the same per-block shape, so a run of consecutive block ids on both sides is
one slice copy.  The device path is chosen once, at construction: on CPU a worker thread does the copy (torch
releases the GIL, so it overlaps the model step); on CUDA a side stream with an event (the copy waits for the
compute stream's pending work, and `done()` queries the event).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from disagg.transfer.base import paired_runs


def copy_blocks(
    src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int], non_blocking: bool = False
) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for every i, one slice copy per run of consecutive ids."""
    for s, d, n in paired_runs(src_ids, dst_ids):
        dst[d : d + n].copy_(src[s : s + n], non_blocking=non_blocking)


class CopyJob(Protocol):
    def done(self) -> bool: ...

    def wait(self) -> None: ...


class _FutureJob:
    def __init__(self, future: Future) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        self._future.result()


class _EventJob:
    def __init__(self, event) -> None:
        self._event = event

    def done(self) -> bool:
        return bool(self._event.query())

    def wait(self) -> None:
        self._event.synchronize()


class BlockCopier:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream: torch.cuda.Stream | None = None
        self._pool: ThreadPoolExecutor | None = None
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device=device)
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-copy")

    def copy(self, src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int]) -> CopyJob:
        if self._stream is None:
            assert self._pool is not None
            return _FutureJob(self._pool.submit(copy_blocks, src, src_ids, dst, dst_ids))
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            copy_blocks(src, src_ids, dst, dst_ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return _EventJob(event)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
