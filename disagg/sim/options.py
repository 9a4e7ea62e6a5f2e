"""The simulated cluster's sizing and fidelity options (shared by `disagg bench simulate`, `disagg plan` and the
lab's simulator studies): one dataclass, the source of every option's default and help (disagg/options.py).

Sizes follow the real cluster the simulation stands for: the lab's KV cache per worker (bench compare), the
engine's context and batch limits, the product's tier sizes (`disagg serve`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from disagg.config import LAB_KV_CACHE_MB, EngineConfig
from disagg.kv.tier_config import TierConfig
from disagg.options import add_options, from_options

_MIB_SHIFT = 20  # MiB <-> bytes


@dataclass
class SimOptions:
    time_model: str | None = field(
        default=None, metadata={"help": "JSON from `disagg bench calibrate` (default: built-in)"}
    )
    num_blocks: int = field(
        default=0,
        metadata={"help": "KV blocks per simulated worker (0: from --kv-cache-mb, as a real worker sizes its cache)"},
    )
    kv_cache_mb: int = field(default=LAB_KV_CACHE_MB, metadata={"help": "KV cache per worker (bench compare's)"})
    max_model_len: int = field(default=EngineConfig.max_model_len, metadata={"help": "prompt + output tokens"})
    max_num_batched_tokens: int = field(
        default=EngineConfig.max_num_batched_tokens, metadata={"help": "per-step token budget of each worker"}
    )
    cpu_tier_mb: int = field(
        default=TierConfig.cpu_bytes >> _MIB_SHIFT,
        metadata={
            "help": "CPU KV tier per worker (disagg serve's default; 0: no tiers); a config's cpu_tier_mb=N "
            "overrides it"
        },
    )
    disk_tier_mb: int = field(default=TierConfig.disk_bytes >> _MIB_SHIFT, metadata={"help": "disk KV tier per worker"})
    session_hints: bool = field(default=False, metadata={"help": "send session ids and KV retention pins"})
    event_delay_ms: float = field(default=2.0, metadata={"help": "KV events reach the router after this"})
    event_jitter_ms: float = field(default=5.0, metadata={"help": "plus up to this (batches may reorder)"})
    cores: int = field(default=0, metadata={"help": "CPU cores all workers share (0: one set each)"})
    threads: int = field(default=1, metadata={"help": "compute threads per worker (with --cores)"})
    request_overhead_ms: float = field(
        default=0.0,
        metadata={"help": "fixed cost per request before a worker sees it (HTTP, router, RPC; fitted on a real run)"},
    )
    machine_model: str = field(
        default="",
        metadata={
            "help": "JSON from bench.sim.machine: the measured co-run slowdown, request overhead and serving CPU of "
            "this machine (with --cores)"
        },
    )
    admission: bool = field(
        default=True,
        metadata={
            "help": "queue each request until a worker has room, as the real router does with its admission "
            "defaults (--no-admission: dispatch every request on arrival)"
        },
    )
    step_slowdown: float = field(
        default=1.0,
        metadata={"help": "factor on step times for what shares the machine with the engines (fitted likewise)"},
    )

    def num_blocks_for(self, bytes_per_block: int) -> int:
        """KV blocks per simulated worker: --num-blocks, else what a real worker's --kv-cache-mb holds."""
        return self.num_blocks or (self.kv_cache_mb << _MIB_SHIFT) // bytes_per_block

    def tier_blocks(self, megabytes: int, bytes_per_block: int) -> int:
        return (megabytes << _MIB_SHIFT) // bytes_per_block


def add_sim_args(parser: argparse.ArgumentParser) -> None:
    """The simulated cluster's sizing and fidelity knobs (shared by `bench simulate` and `disagg plan`)."""
    add_options(parser, SimOptions)


def sim_options(args: argparse.Namespace) -> SimOptions:
    return from_options(SimOptions, args)
