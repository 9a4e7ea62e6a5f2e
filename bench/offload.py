"""Offload bandwidth: the TieredStore's store and load paths per tier against raw copies of the same bytes, timed
in interleaved rounds in one process, plus NIXL's POSIX backend as the alternative disk path.

Rows (N blocks of one model's KV block shape):
  cpu store   device cache -> CPU tier (write-through copy, commit)      vs  torch copy_ of the same bytes
  cpu load    CPU tier -> device cache (KVLoad through the store)          vs  torch copy_
  disk store  CPU tier -> disk (demotion: header, crc32, temp + rename)    vs  plain write() of one file per block
                                                                               (on the store's I/O thread count),
                                                                               and NIXL POSIX (open, register, WRITE,
                                                                               deregister, rename per block)
  disk load   disk -> device cache (read, verify, copy in)                 vs  plain read() of the same files,
                                                                               and NIXL POSIX READ into memory
The disk rows read through the page cache (dropping it needs privileges the CI machine does not have); their
ratios compare like with like, the absolute GB/s are memory-bound, not the device's.

    .venv/bin/python -m bench.offload --blocks 128 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.common import emit, print_table
from disagg.engine.block_pool import BlockPool
from disagg.kv.connector import KVLoad, LoadState, SourceKind
from disagg.kv.disk_tier import DiskTier
from disagg.kv.store import TierConfig, TieredStore
from disagg.options import add_options, from_options
from disagg.protocol import Tier


@dataclass
class OffloadOptions:
    blocks: int = field(default=128, metadata={"help": "KV blocks moved per measurement"})
    repeats: int = field(default=5, metadata={"help": "interleaved rounds (their median is reported)"})
    out: str = field(default="bench/results/offload.json", metadata={"help": "JSON file the results go to"})


SHAPES = {
    "smollm2-135m (fp32)": ((30, 2, 16, 3, 64), torch.float32),
    "llama-3.2-1b (bf16)": ((16, 2, 16, 8, 64), torch.bfloat16),
}


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


class Rig:
    """One TieredStore over a device cache of `n` filled blocks, on a scratch directory."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, root: Path) -> None:
        self.n = n
        self.kv = torch.randn((n, *shape), dtype=torch.float32).to(dtype)
        self.pool = BlockPool(n)
        block_bytes = self.kv[0].numel() * self.kv.element_size()
        self.bytes = n * block_bytes
        self.block_bytes = block_bytes
        self.root = root
        self.config = TierConfig(
            cpu_bytes=(n + 1) * block_bytes,
            disk_dir=str(root / "disk"),
            disk_bytes=4 * n * (block_bytes + 64),
            low_watermark=0.0,
        )
        self.store = TieredStore(self.config, self.pool, self.kv, "0123456789abcdef")
        self.round = 0

    @property
    def disk(self) -> DiskTier:
        disk = self.store.disk
        assert disk is not None, "the rig's TierConfig has a disk directory"
        return disk

    def clear_disk(self) -> None:
        """Drop the disk tier's files and index: the next round writes fresh ones."""
        shutil.rmtree(self.disk.dir)
        self.disk.dir.mkdir()
        assert self.store.index.disk is not None
        self.store.index.disk.clear()

    def hashes(self) -> list[int]:
        return [self.round * 1_000_003 + i + 1 for i in range(self.n)]

    def cpu_store(self) -> float:
        self.round += 1
        ids = list(range(self.n))
        t0 = time.perf_counter()
        held = self.pool.allocate(self.n)
        self.store.store(held, self.hashes())
        self.store.flush()
        elapsed = time.perf_counter() - t0
        self.pool.free(held)
        assert len(held) == len(ids) and len(self.store.index.cpu) >= self.n
        return elapsed

    def _load(self, tier: Tier) -> float:
        hashes = self.hashes()
        load = KVLoad(
            "bench",
            SourceKind.TIERS,
            0,
            self.n,
            self.n * 16,
            time.monotonic() + 600,
            block_hashes=hashes,
            tiers=[tier] * self.n,
            dst_block_ids=list(range(self.n)),
        )
        t0 = time.perf_counter()
        self.store.start(load)
        while self.store.poll(load) is LoadState.PENDING:
            time.sleep(0.0002)
        elapsed = time.perf_counter() - t0
        assert load.num_ok_blocks == self.n, f"{tier}: {load.num_ok_blocks} of {self.n} blocks loaded"
        return elapsed

    def cpu_load(self) -> float:
        return self._load(Tier.CPU)

    def disk_store(self) -> float:
        t0 = time.perf_counter()
        self.store.demote()
        self.store.flush()
        elapsed = time.perf_counter() - t0
        disk = self.store.index.disk
        assert disk is not None and len(disk) >= self.n and len(self.store.index.cpu) == 0
        return elapsed

    def disk_load(self) -> float:
        return self._load(Tier.DISK)


def _on_threads(threads: int, n: int, one: Callable[[int], object]) -> float:
    """Seconds to run `one(i)` for every block i on `threads` threads (the blocks split into contiguous runs, as
    the store splits its disk work over its I/O threads)."""
    runs = [range(k * n // threads, (k + 1) * n // threads) for k in range(threads)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda run: [one(i) for i in run], runs))
        return time.perf_counter() - t0


def raw_memcpy(src: torch.Tensor, dst: torch.Tensor) -> float:
    """One copy_ of the same bytes into an already touched buffer (as the CPU tier is), issued from one worker
    thread as the store's copier issues its copies (torch's own intra-op threads alike on both sides)."""
    return _on_threads(1, 1, lambda _: dst.copy_(src))


def raw_file_write(kv: torch.Tensor, d: Path, threads: int) -> float:
    """One fresh file per block (no header, no checksum, no rename), on as many threads as the store's disk I/O
    uses, so the ratio compares the work per byte and not the parallelism."""
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    views = [kv[i].view(-1).view(torch.uint8).numpy().data for i in range(kv.shape[0])]

    def write(i: int) -> None:
        with open(d / f"{i}.raw", "wb") as f:
            f.write(views[i])

    return _on_threads(threads, len(views), write)


def raw_file_read(n: int, block_bytes: int, d: Path, threads: int) -> float:
    def read(i: int) -> None:
        buf = bytearray(block_bytes)
        with open(d / f"{i}.raw", "rb", buffering=0) as f:
            f.readinto(buf)

    return _on_threads(threads, n, read)


class NixlPosix:
    """NIXL's POSIX backend moving the same blocks between memory and one file per block."""

    def __init__(self, kv: torch.Tensor, d: Path) -> None:
        from nixl_cu12._api import nixl_agent, nixl_agent_config

        self.kv, self.d = kv, d
        d.mkdir(parents=True, exist_ok=True)
        self.agent = nixl_agent(f"posix-bench-{os.getpid()}", nixl_agent_config(backends=["POSIX"]))
        self.agent.register_memory(kv)
        self.bb = kv[0].numel() * kv.element_size()
        self.mem = self.agent.get_xfer_descs([(kv[i].data_ptr(), self.bb, 0) for i in range(kv.shape[0])], "DRAM")

    def _xfer(self, op: str, fds: list[int]) -> None:
        files = self.agent.get_xfer_descs([(0, self.bb, fd) for fd in fds], "FILE")
        handle = self.agent.initialize_xfer(op, self.mem, files, self.agent.name)
        self.agent.transfer(handle)
        while (state := self.agent.check_xfer_state(handle)) not in ("DONE", "ERR"):
            pass
        self.agent.release_xfer_handle(handle)
        if state == "ERR":
            raise RuntimeError(f"NIXL POSIX {op} failed")

    def write(self) -> float:
        """What a NIXL disk tier would do: per block open a temp file, register it, WRITE, deregister, rename."""
        n = self.kv.shape[0]
        t0 = time.perf_counter()
        fds = [os.open(self.d / f"{i}.tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC) for i in range(n)]
        for fd in fds:
            os.ftruncate(fd, self.bb)
        reg = self.agent.register_memory([(0, self.bb, fd, f"b{i}") for i, fd in enumerate(fds)], "FILE")
        self._xfer("WRITE", fds)
        self.agent.deregister_memory(reg)
        for i, fd in enumerate(fds):
            os.close(fd)
            os.replace(self.d / f"{i}.tmp", self.d / f"{i}.blk")
        return time.perf_counter() - t0

    def read(self) -> float:
        n = self.kv.shape[0]
        t0 = time.perf_counter()
        fds = [os.open(self.d / f"{i}.blk", os.O_RDONLY) for i in range(n)]
        reg = self.agent.register_memory([(0, self.bb, fd, f"b{i}") for i, fd in enumerate(fds)], "FILE")
        self._xfer("READ", fds)
        self.agent.deregister_memory(reg)
        for fd in fds:
            os.close(fd)
        return time.perf_counter() - t0


def bench_shape(name: str, shape: tuple[int, ...], dtype: torch.dtype, n: int, repeats: int) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="offload-bench-"))
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "cpu_store",
            "cpu_load",
            "disk_store",
            "disk_load",
            "memcpy",
            "raw_write",
            "raw_read",
            "nixl_write",
            "nixl_read",
        )
    }
    try:
        rig = Rig(n, shape, dtype, root)
        nixl = NixlPosix(rig.kv, root / "nixl")
        scratch = torch.zeros_like(rig.kv)
        for _ in range(repeats):  # interleaved: every method sees the same machine state in each round
            times["cpu_store"].append(rig.cpu_store())
            times["memcpy"].append(raw_memcpy(rig.kv, scratch))
            times["cpu_load"].append(rig.cpu_load())
            times["disk_store"].append(rig.disk_store())
            times["raw_write"].append(raw_file_write(rig.kv, root / "raw", rig.config.io_threads))
            times["nixl_write"].append(nixl.write())
            times["disk_load"].append(rig.disk_load())
            times["raw_read"].append(raw_file_read(n, rig.block_bytes, root / "raw", rig.config.io_threads))
            times["nixl_read"].append(nixl.read())
            rig.clear_disk()  # the next round writes fresh files
        med = {k: _gbps(rig.bytes, statistics.median(v)) for k, v in times.items()}
        rig.store.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mib = rig.bytes / 2**20

    def row(path: str, ours: str, raw: str, nixl: str | None) -> dict:
        # the ratio per interleaved round (same machine state), then its median and range
        ratios = [r / o for o, r in zip(times[ours], times[raw])]
        return {
            "shape": name,
            "path": path,
            "MiB": mib,
            "ours GB/s": med[ours],
            "raw GB/s": med[raw],
            "ours / raw": statistics.median(ratios),
            "ratio min": min(ratios),
            "ratio max": max(ratios),
            "NIXL POSIX GB/s": med[nixl] if nixl else None,
        }

    return [
        row("cpu store", "cpu_store", "memcpy", None),
        row("cpu load", "cpu_load", "memcpy", None),
        row("disk store", "disk_store", "raw_write", "nixl_write"),
        row("disk load", "disk_load", "raw_read", "nixl_read"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, OffloadOptions)
    args = from_options(OffloadOptions, parser.parse_args(argv))
    rows = []
    for name, (shape, dtype) in SHAPES.items():
        rows += bench_shape(name, shape, dtype, args.blocks, args.repeats)
    print_table(rows, f"offload bandwidth, {args.blocks} blocks, median of {args.repeats} interleaved rounds")
    emit({"rows": rows, "settings": asdict(args)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
