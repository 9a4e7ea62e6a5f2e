"""KV transfer: NixlTransport block reads vs raw NIXL (one contiguous descriptor) vs memcpy, same bytes.

A second process owns the source KV cache (the prefill side) and exposes it over NIXL/UCX; this process (the
decode side) reads the blocks of a 1k / 4k / 16k-token request into its own cache.  Block ids are either
scattered (a pool after churn: every block its own descriptor) or consecutive (a fresh pool: runs merge).
Also measures the transfer's share of TTFT for a disaggregated request on a real 1P+1D Ray cluster, and, per KV
format (`--kv-dtype`: float32, bfloat16, int8), the time one request's blocks take to read, interleaved round by
round, and the KV read inside a disaggregated request on the real cluster.

    .venv/bin/python -m bench.kv_transfer
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import time
from dataclasses import dataclass, field

import torch

from bench.common import emit, print_table
from disagg.config import SERVE_KV_CACHE_MB, EngineConfig
from disagg.options import add_options, from_options
from disagg.protocol import Tier
from disagg.transfer.base import KVLayout, TransferState
from disagg.transfer.nixl import NixlTransport
from disagg.workload.metrics import mean, percentile


@dataclass
class KVTransferOptions:
    tokens: list[int] = field(
        default_factory=lambda: [1024, 4096, 16384], metadata={"nargs": "+", "help": "prompt lengths whose KV is read"}
    )
    repeats: int = field(default=7, metadata={"help": "reads per length (the median is reported)"})
    ttft_prompt_tokens: int = field(default=1024, metadata={"help": "prompt of the transfer-share-of-TTFT run"})
    sections: list[str] = field(
        default_factory=lambda: ["shapes", "formats", "ttft"],
        metadata={"nargs": "+", "help": "what to run: shapes (methods per KV shape), formats, ttft (real cluster)"},
    )
    kv_dtypes: list[str] = field(
        default_factory=lambda: ["auto", "int8"],
        metadata={"nargs": "+", "help": "KV formats of the real-cluster runs (the first is the baseline)"},
    )
    out: str = field(default="bench/results/kv_transfer.json", metadata={"help": "JSON file the results go to"})


SHAPES = {  # layers, kv_heads, head_dim, dtype
    "smollm2-135m (fp32)": (30, 3, 64, torch.float32),
    "llama-3.2-1b (bf16)": (16, 8, 64, torch.bfloat16),
}
# the default model's KV per format (--kv-dtype): int8 and fp8 store 64 one-byte values and a 2-byte scale
FORMATS = {
    "float32": (30, 3, 64, torch.float32),
    "bfloat16": (30, 3, 64, torch.bfloat16),
    "int8": (30, 3, 66, torch.uint8),
}
BLOCK = 16


def _kv(shape, num_blocks):
    layers, heads, dim, dtype = shape
    return torch.empty(num_blocks, layers, 2, BLOCK, heads, dim, dtype=dtype)  # the engine's block-major layout


def _owner(conn, shape, num_blocks, name="bench-src") -> None:
    """The prefill side: a registered, filled cache, served until told to stop."""
    kv = _kv(shape, num_blocks)
    kv.view(torch.uint8).random_(0, 255)
    transport = NixlTransport(name)
    transport.register(kv)
    conn.send(transport.layout().to_wire())
    conn.recv()


def _wait(transport, handle) -> None:
    while (state := transport.poll(handle)) == TransferState.PENDING:
        pass
    if state != TransferState.DONE:
        raise RuntimeError("transfer failed")


def _time_interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Time each method once per round, rounds repeated: drift on a shared machine hits all methods alike."""
    for fn in fns.values():
        fn()  # warm-up (connection set-up, page faults)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_shape(name, shape, token_counts, repeats) -> list[dict]:
    num_blocks = max(token_counts) // BLOCK * 2
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    owner = ctx.Process(target=_owner, args=(child, shape, num_blocks), daemon=True)
    owner.start()
    remote = KVLayout.from_wire(parent.recv())
    dst_kv = _kv(shape, num_blocks)
    dst = NixlTransport("bench-dst")
    dst.register(dst_kv)
    dst.add_peer(remote)
    agent = dst.agent
    local = dst.layout()
    src_copy = _kv(shape, num_blocks)
    rows = []
    rng = random.Random(0)
    for tokens in token_counts:
        n = tokens // BLOCK
        nbytes = n * remote.block_bytes
        scattered_src = rng.sample(range(num_blocks), n)
        scattered_dst = rng.sample(range(num_blocks), n)

        def ours(src_ids, dst_ids):
            handle = dst.read(remote.agent_name, [(Tier.DEVICE, b) for b in src_ids], dst_ids, b"")
            _wait(dst, handle)
            dst.release(handle)

        def raw(nbytes: int = nbytes) -> None:  # the same byte count as one contiguous region on each side
            ld = agent.get_xfer_descs([(local.region(Tier.DEVICE).base_addr, nbytes, 0)], "DRAM")
            rd = agent.get_xfer_descs([(remote.region(Tier.DEVICE).base_addr, nbytes, 0)], "DRAM")
            handle = agent.initialize_xfer("READ", ld, rd, remote.agent_name, b"")
            agent.transfer(handle)
            while (state := agent.check_xfer_state(handle)) == "PROC":
                pass
            if state != "DONE":
                raise RuntimeError(f"raw NIXL read: {state}")
            agent.release_xfer_handle(handle)

        flat_src = src_copy.view(-1)[: nbytes // src_copy.element_size()]
        flat_dst = dst_kv.view(-1)[: nbytes // dst_kv.element_size()]
        times = _time_interleaved(
            {
                # defaults bind this iteration's values (each closure runs before the loop moves on)
                "scattered": lambda src=scattered_src, dst=scattered_dst: ours(src, dst),
                "consecutive": lambda n=n: ours(list(range(n)), list(range(n, 2 * n))),
                "raw": raw,
                "memcpy": lambda src=flat_src, dst=flat_dst: dst.copy_(src),
            },
            repeats,
        )
        t_scattered, t_consecutive, t_raw, t_memcpy = (times[k] for k in ("scattered", "consecutive", "raw", "memcpy"))
        gbps = lambda ts, nbytes=nbytes: nbytes / percentile(ts, 50) / 1e9  # noqa: E731
        rows.append(
            {
                "shape": name,
                "tokens": tokens,
                "MiB": nbytes / 2**20,
                "ours_scattered_GB_s": gbps(t_scattered),
                "ours_consecutive_GB_s": gbps(t_consecutive),
                "raw_nixl_GB_s": gbps(t_raw),
                "memcpy_GB_s": gbps(t_memcpy),
                "scattered_vs_raw": percentile(t_raw, 50) / percentile(t_scattered, 50),
                "consecutive_vs_raw": percentile(t_raw, 50) / percentile(t_consecutive, 50),
                "ours_scattered_p50_ms": percentile(t_scattered, 50) * 1e3,
                "ours_scattered_p99_ms": percentile(t_scattered, 99) * 1e3,
                "descriptors_scattered": n,
            }
        )
    parent.send("stop")
    owner.join(10)
    return rows


def bench_formats(token_counts: list[int], repeats: int) -> list[dict]:
    """One request's blocks (scattered ids) read over NIXL in each KV format, the formats interleaved round by
    round (one owner process and one reading agent per format), with each format's ratio to float32."""
    num_blocks = max(token_counts) // BLOCK * 2
    ctx = mp.get_context("spawn")
    owners, readers, caches = [], {}, []
    for i, (name, shape) in enumerate(FORMATS.items()):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_owner, args=(child, shape, num_blocks, f"bench-src-{i}"), daemon=True)
        proc.start()
        remote = KVLayout.from_wire(parent.recv())
        dst = NixlTransport(f"bench-dst-{i}")
        caches.append(_kv(shape, num_blocks))  # registered memory must outlive the reads
        dst.register(caches[-1])
        dst.add_peer(remote)
        owners.append((proc, parent))
        readers[name] = (dst, remote)
    rng = random.Random(0)
    rows = []
    for tokens in token_counts:
        n = tokens // BLOCK
        src_ids, dst_ids = rng.sample(range(num_blocks), n), rng.sample(range(num_blocks), n)

        def read(dst, remote, src_ids=src_ids, dst_ids=dst_ids) -> None:
            handle = dst.read(remote.agent_name, [(Tier.DEVICE, b) for b in src_ids], dst_ids, b"")
            _wait(dst, handle)
            dst.release(handle)

        times = _time_interleaved({k: lambda d=d, r=r: read(d, r) for k, (d, r) in readers.items()}, repeats)
        base = percentile(times["float32"], 50)
        for name, ts in times.items():
            remote = readers[name][1]
            rows.append(
                {
                    "tokens": tokens,
                    "kv_dtype": name,
                    "bytes_per_token": remote.block_bytes // BLOCK,
                    "MiB": n * remote.block_bytes / 2**20,
                    "p50_ms": percentile(ts, 50) * 1e3,
                    "min_ms": min(ts) * 1e3,
                    "max_ms": max(ts) * 1e3,
                    "time_vs_float32": percentile(ts, 50) / base,
                    "bytes_vs_float32": remote.block_bytes / readers["float32"][1].block_bytes,
                }
            )
    for proc, conn in owners:
        conn.send("stop")
        proc.join(10)
    return rows


def ttft_share(prompt_tokens: int, requests: int, kv_dtype: str = "auto") -> dict:
    """TTFT of a disaggregated request on a 1P+1D cluster (default model) and the KV read inside it."""
    import ray

    from disagg.cluster.launch import ClusterConfig, LocalCluster, init_ray
    from disagg.protocol import Request, SamplingParams
    from disagg.stats import WorkerStats

    init_ray(None)  # a local cluster on loopback
    cluster = LocalCluster(
        ClusterConfig(
            engine=EngineConfig(
                kv_cache_memory_mb=SERVE_KV_CACHE_MB, num_threads=1, max_num_batched_tokens=2048, kv_dtype=kv_dtype
            )
        )
    )
    decode = cluster.decode[0]
    ttfts, reads = [], []

    async def one(i):
        prompt = [(i * 7919 + j * 31) % 40000 + 100 for j in range(prompt_tokens)]  # no shared prefix
        before = WorkerStats.from_wire(ray.get(decode.stats.remote())).transfer_seconds
        t0 = time.perf_counter()
        async for _ in cluster.client.generate(Request(f"t{i}", prompt, SamplingParams(max_tokens=1))):
            ttfts.append(time.perf_counter() - t0)
            break
        reads.append(WorkerStats.from_wire(ray.get(decode.stats.remote())).transfer_seconds - before)

    for i in range(requests + 1):
        asyncio.run(one(i))
    ttfts, reads = ttfts[1:], reads[1:]  # first request warms up
    cluster.shutdown()
    ray.shutdown()
    return {
        "kv_dtype": kv_dtype,
        "prompt_tokens": prompt_tokens,
        "ttft_mean_ms": mean(ttfts) * 1e3,
        "kv_read_mean_ms": mean(reads) * 1e3,
        "transfer_share_of_ttft": mean(reads) / mean(ttfts),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, KVTransferOptions)
    args = from_options(KVTransferOptions, parser.parse_args(argv))
    rows, formats, shares = [], [], []
    if "shapes" in args.sections:
        for name, shape in SHAPES.items():
            rows += bench_shape(name, shape, args.tokens, args.repeats)
        print_table(rows, "KV transfer over NIXL (UCX, DRAM, two processes on loopback), p50 of reads")
    if "formats" in args.sections:
        formats = bench_formats(args.tokens, args.repeats)
        print_table(formats, "one request's KV read over NIXL by KV format, formats interleaved, p50 and range")
    if "ttft" in args.sections:
        shares = [ttft_share(args.ttft_prompt_tokens, requests=3, kv_dtype=kd) for kd in args.kv_dtypes]
        print_table(shares, "transfer share of TTFT, disaggregated 1P+1D, default model")
    emit({"benchmark": "kv_transfer", "block_size": BLOCK, "rows": rows, "formats": formats, "ttft": shares}, args.out)


if __name__ == "__main__":
    main()
