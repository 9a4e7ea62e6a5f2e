"""A worker's tier settings (TierConfig), the counters its TieredStore keeps (TierStats, read by heartbeats and
the simulator), its levels (TierGauges), and the lookup rule both the store and the simulated tiers follow
(`leading_tiers`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from disagg.protocol import CorruptReason, Tier


@dataclass
class TierConfig:
    """Sizes and knobs of one worker's tiers (defaults suit a laptop)."""

    cpu_bytes: int = 256 << 20
    disk_dir: str = ""  # "" = no disk tier
    disk_bytes: int = 1 << 30
    disk_fsync: bool = False  # fsync each block file before the rename (durable across power loss; slower)
    low_watermark: float = 0.05  # keep this fraction of CPU slots free by demoting ahead of need
    pin_budget_fraction: float = field(
        default=0.5, metadata={"help": "at most this fraction of a worker's CPU-tier slots pinned by sessions"}
    )
    tenant_pin_share: float = field(  # isolation: one tenant's long pins cannot push every other tenant's out
        default=0.5, metadata={"help": "at most this fraction of those pins held by one named tenant's sessions"}
    )
    io_threads: int = 2
    ewma_alpha: float = 0.2  # smoothing of the measured per-block load times
    # where a launcher gives each of its workers a disk tier (cluster/worker.py `worker_tiers`): disk_dir becomes
    # <disk_root>/<worker slot> unless disk_dir is set; None: $DISAGG_KV_ROOT, else ~/.cache/disagg/kv; "": no
    # disk tier.  The store itself reads only disk_dir.
    disk_root: str | None = None

    def __post_init__(self) -> None:
        if self.cpu_bytes < 0 or self.disk_bytes < 0:
            raise ValueError("tier sizes must be >= 0")
        if not 0 <= self.low_watermark < 1 or not 0 <= self.pin_budget_fraction <= 1:
            raise ValueError("low_watermark in [0, 1), pin_budget_fraction in [0, 1]")
        if not 0 < self.tenant_pin_share <= 1:
            raise ValueError("tenant_pin_share in (0, 1]")


@dataclass
class TierStats:
    query_blocks: int = 0  # blocks looked up in the tiers (after a device miss)
    hit_blocks: Counter = field(default_factory=Counter)  # per tier
    loaded_blocks: Counter = field(default_factory=Counter)
    load_seconds: defaultdict[Tier, float] = field(default_factory=lambda: defaultdict(float))
    loads: Counter = field(default_factory=Counter)
    stored_blocks: Counter = field(default_factory=Counter)
    bytes_stored: Counter = field(default_factory=Counter)
    bytes_loaded: Counter = field(default_factory=Counter)
    evictions: Counter = field(default_factory=Counter)
    corrupt: Counter[CorruptReason] = field(default_factory=Counter)
    store_skipped: int = 0  # no CPU slot could be freed for a store
    write_failures: int = 0
    failed_loads: int = 0

    def count_lookup(self, num_queried: int, tiers: list[Tier]) -> None:
        self.query_blocks += num_queried
        self.hit_blocks.update(tiers)

    def count_load(self, ok_tiers: list[Tier], num_blocks: int, seconds: float, block_bytes: int) -> Tier | None:
        """A load of `num_blocks` finished with the leading `ok_tiers` intact; returns the tier it is counted
        under (disk if any block came from disk), None if nothing arrived."""
        if not ok_tiers:
            self.failed_loads += 1
            return None
        tier = Tier.DISK if Tier.DISK in ok_tiers else Tier.CPU
        self.loads[tier] += 1
        self.load_seconds[tier] += seconds
        for t in ok_tiers:
            self.loaded_blocks[t] += 1
            self.bytes_loaded[t] += block_bytes
        if len(ok_tiers) < num_blocks:
            self.failed_loads += 1
        return tier


@dataclass
class TierGauges:
    """A worker's tier levels now (heartbeats report them as WorkerStats' `tier_*` gauges); the disk figures are
    None without a disk tier, or where the tiers do not know them (the simulated disk counts no bytes)."""

    cpu_blocks: int
    cpu_capacity_blocks: int
    pinned_blocks: int
    pinned_sessions: int
    stores_in_flight: int = 0
    demotions_in_flight: int = 0
    disk_blocks: int | None = None
    disk_bytes: int | None = None
    disk_capacity_bytes: int | None = None


class HoldsBlocks(Protocol):
    def __contains__(self, block_hash: int, /) -> bool: ...


def leading_tiers(block_hashes: list[int], cpu: HoldsBlocks, disk: HoldsBlocks | None) -> list[Tier]:
    """The tier of each leading block the tiers hold (CPU before disk), up to the first one neither holds."""
    tiers: list[Tier] = []
    for h in block_hashes:
        if h in cpu:
            tiers.append(Tier.CPU)
        elif disk is not None and h in disk:
            tiers.append(Tier.DISK)
        else:
            break
    return tiers
