"""Sleep and wake: a model nobody asks for gives its KV memory back, and takes it again faster than a cold load
(vLLM's sleep level 1; the front door's `POST /admin/models/{id}/sleep` and `/wake`: http/admin_sleep.py).

Asleep, an engine holds no KV.  Its prefix cache is forgotten (a CLEARED event: routers drop its device blocks,
while the CPU and disk tiers keep theirs and stay readable), and the pages of the KV tensor go back to the
operating system with `madvise(MADV_DONTNEED)`.  The tensor keeps its address, so the transport's registration
with NIXL and the layout its peers hold stay valid: nothing is re-registered or re-exchanged, and waking is a state
change.  The pages come back, as zeros, when the next steps write them.  The weights stay where they are (in CPU
memory on a CPU worker).

States (a SleepState per engine): AWAKE -> `sleep()` (refused while any KV block is in use: running requests,
leases a reader has not released) -> ASLEEP -> `wake()` -> AWAKE.  The worker refuses requests while ASLEEP.

Only where the KV lives in host memory (a CPU device, on Linux).  A GPU's VRAM needs its physical pages unmapped
under a kept virtual range (CUDA's cuMem, as vLLM's CuMemAllocator does): not built, so sleep is refused there with
that reason.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import time
from typing import TYPE_CHECKING

from disagg.errors import SLEEP_UNSUPPORTED, Conflict, InvalidRequest
from disagg.protocol import SleepReport, SleepState

if TYPE_CHECKING:
    import torch

    from disagg.engine.engine import LLMEngine

_MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return 0


def release_pages(tensor: torch.Tensor) -> int:
    """Give the whole pages inside `tensor`'s memory back to the operating system (they read as zeros after);
    the bytes released.  The partial pages at either end stay: they may hold a neighbour's data."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_DONTNEED) failed: {os.strerror(err)}")
    return last - first


def sleep_refusal(engine: LLMEngine) -> str | None:
    """Why this engine cannot sleep at all (None: it can)."""
    if engine.device.type != "cpu":
        return (
            f"sleep frees host pages under a kept address; KV on {engine.device.type} needs its physical memory "
            "unmapped under a kept virtual range (cuMem), which is not built"
        )
    if not sys.platform.startswith("linux"):
        return f"sleep needs madvise(MADV_DONTNEED) as Linux has it; this is {sys.platform}"
    return None


class Sleeper:
    """One engine's sleep state.  Engine thread only (the worker runs every call there)."""

    def __init__(self, engine: LLMEngine, worker: str) -> None:
        self.engine, self.worker = engine, worker
        self.state = SleepState.AWAKE

    @property
    def asleep(self) -> bool:
        return self.state is SleepState.ASLEEP

    def sleep(self) -> SleepReport:
        started = time.perf_counter()
        if self.asleep:
            return self._report(SleepState.ASLEEP, 0, started)
        refusal = sleep_refusal(self.engine)
        if refusal is not None:
            raise InvalidRequest(f"{self.worker}: {refusal}", code=SLEEP_UNSUPPORTED)
        if self.engine.has_unfinished():
            raise Conflict(f"{self.worker}: requests are still running")
        if not self.engine.pool.reset_prefix_cache():  # a lease a reader has not released yet
            raise Conflict(f"{self.worker}: KV blocks are still leased to a reader")
        kv = self.engine.kv_tensor
        released = release_pages(kv) if kv is not None else 0
        self.state = SleepState.ASLEEP
        return self._report(SleepState.ASLEEP, released, started)

    def wake(self) -> SleepReport:
        started = time.perf_counter()
        self.state = SleepState.AWAKE
        return self._report(SleepState.AWAKE, 0, started)

    def _report(self, state: SleepState, released: int, started: float) -> SleepReport:
        return SleepReport(self.worker, state, released, time.perf_counter() - started, resident_bytes())
