"""KVTransport: how one worker reads KV blocks out of another worker's registered memory.

A worker registers up to two regions, both block-major with the same per-block layout: its device KV cache
(Tier.DEVICE) and its CPU tier (Tier.CPU).  One block - K and V of every layer - is one contiguous region of
`block_bytes`, and consecutive block ids are adjacent, so `plan_regions` turns (remote region, remote id) ->
local id pairs into (address, length) descriptors, merging runs that are consecutive on both sides: one
descriptor per run of blocks.  Reads always land in the reader's device cache.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from disagg.errors import TransferFailed
from disagg.protocol import Tier, WireMessage


class TransferHandle:
    """A read in flight as the transport that posted it knows it (each transport subclasses it with its own
    state); the reader only hands it back to the same transport's `poll` and `release`."""


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass
class KVRegion:
    base_addr: int
    num_blocks: int
    mem_type: str  # "DRAM" | "VRAM"
    device_id: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> KVRegion:
        if not tensor.is_contiguous():
            raise ValueError("a registered KV region must be one contiguous tensor")
        return cls(tensor.data_ptr(), tensor.shape[0], "VRAM" if tensor.is_cuda else "DRAM", tensor.device.index or 0)


@dataclass
class KVLayout(WireMessage):
    """What a peer needs to address this worker's KV memory, sent once per pair (and again after a restart)."""

    TYPE: ClassVar[str] = "kv_layout"
    agent_name: str
    agent_metadata: bytes
    num_layers: int
    block_bytes: int  # one block: K and V of every layer
    regions: dict[Tier, KVRegion]
    # the engine fingerprint (disagg/kv/fingerprint.py): peers whose fingerprints differ never read each other's
    # KV (other weights, KV format or layout: the bytes would mean other numbers); "" where the owner has none
    fingerprint: str = ""

    @classmethod
    def of(
        cls,
        kv: torch.Tensor,
        agent_name: str,
        agent_metadata: bytes,
        cpu_tier: torch.Tensor | None = None,
        fingerprint: str = "",
    ) -> KVLayout:
        regions = {Tier.DEVICE: KVRegion.of(kv)}
        if cpu_tier is not None:
            if cpu_tier.shape[1:] != kv.shape[1:] or cpu_tier.dtype != kv.dtype:
                raise ValueError("the CPU tier must have the device cache's block layout")
            regions[Tier.CPU] = KVRegion.of(cpu_tier)
        return cls(
            agent_name=agent_name,
            agent_metadata=agent_metadata,
            num_layers=kv.shape[1],
            block_bytes=kv[0].numel() * kv.element_size(),
            regions=regions,
            fingerprint=fingerprint,
        )

    def region(self, tier: Tier) -> KVRegion:
        region = self.regions.get(tier)
        if region is None:
            raise TransferFailed(f"{self.agent_name} has no {tier.value} region")
        return region


def paired_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) runs where both id sequences advance by one."""
    if len(src_ids) != len(dst_ids):
        raise ValueError("source and destination block lists differ in length")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


@dataclass
class RegionPlan:
    """The descriptors of one transfer: everything that reads from one remote memory type."""

    src_mem_type: str
    src_device_id: int
    src: list[tuple[int, int]]  # (addr, len)
    dst: list[tuple[int, int]]


def plan_regions(
    src: KVLayout, dst: KVLayout, src_refs: list[tuple[Tier, int]], dst_ids: list[int]
) -> list[RegionPlan]:
    """Descriptor lists for copying blocks `src_refs` ((region, id) on `src`) into `dst_ids` of dst's device
    cache, one plan per remote memory type (a DRAM-only host needs one transfer for device and CPU blocks)."""
    if src.fingerprint and dst.fingerprint and src.fingerprint != dst.fingerprint:
        raise TransferFailed(
            f"{src.agent_name} and {dst.agent_name} hold KV of different engines (fingerprints {src.fingerprint} "
            f"and {dst.fingerprint}: weights, KV format or layout); recompute instead"
        )
    if (src.num_layers, src.block_bytes) != (dst.num_layers, dst.block_bytes):
        raise TransferFailed("peers have different KV layouts (layers or block bytes); a pack step is needed")
    if len(src_refs) != len(dst_ids):
        raise ValueError("source and destination block lists differ in length")
    local = dst.region(Tier.DEVICE)
    if any(not 0 <= b < local.num_blocks for b in dst_ids):
        raise TransferFailed(f"block id out of range for {dst.agent_name} ({local.num_blocks} blocks)")
    plans: dict[tuple[str, int], RegionPlan] = {}
    groups: dict[Tier, tuple[list[int], list[int]]] = {}
    for (tier, b), d in zip(src_refs, dst_ids):
        ids = groups.setdefault(tier, ([], []))
        ids[0].append(b)
        ids[1].append(d)
    bb = src.block_bytes
    for tier, (s_ids, d_ids) in groups.items():
        region = src.region(tier)
        if any(not 0 <= b < region.num_blocks for b in s_ids):
            raise TransferFailed(
                f"block id out of range for {src.agent_name}'s {tier.value} region ({region.num_blocks} blocks)"
            )
        plan = plans.setdefault(
            (region.mem_type, region.device_id), RegionPlan(region.mem_type, region.device_id, [], [])
        )
        for s, d, n in paired_runs(s_ids, d_ids):
            plan.src.append((region.base_addr + s * bb, n * bb))
            plan.dst.append((local.base_addr + d * bb, n * bb))
    return list(plans.values())


class KVTransport(ABC):
    """One per worker. A reader calls `read`; the owner sees the read's notification when it completes."""

    bytes_read: int = 0

    @abstractmethod
    def register(self, kv: torch.Tensor, cpu_tier: torch.Tensor | None = None, fingerprint: str = "") -> None:
        """Register the device cache (and the CPU tier) for peers to read; `fingerprint` goes in the layout."""

    @abstractmethod
    def layout(self) -> KVLayout: ...

    @abstractmethod
    def set_peers(self, layouts: list[KVLayout]) -> None:
        """Make exactly these peers known (adding new agents, removing ones no longer listed: a restarted
        worker's old incarnation is dropped, which fails any transfer still waiting on it)."""

    @abstractmethod
    def read(
        self, peer: str, remote_refs: list[tuple[Tier, int]], local_blocks: list[int], notify: bytes
    ) -> TransferHandle:
        """Start copying the peer's blocks into ours; `notify` reaches the peer when the read completes."""

    @abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState: ...

    @abstractmethod
    def release(self, handle: TransferHandle) -> None: ...

    @abstractmethod
    def notify(self, peer: str, message: bytes) -> None:
        """Send a message to a peer without moving data (e.g. 'nothing to read, release your blocks')."""

    @abstractmethod
    def notifications(self) -> list[bytes]:
        """Messages peers attached to reads of our memory that have completed since the last call."""

    def add_peer(self, layout: KVLayout) -> None:
        """Add one peer, keeping the others."""
        self.set_peers([*self.peer_layouts(), layout])

    def peer_layouts(self) -> list[KVLayout]:
        return []

    def close(self) -> None:  # noqa: B027 - optional hook: a transport without an agent has nothing to free
        """Release the agent (shutdown)."""
