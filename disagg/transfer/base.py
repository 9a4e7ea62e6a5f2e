"""KVTransport: how a decode worker reads KV blocks out of a prefill worker's cache.

The cache tensor is [blocks, layers, 2, block_size, kv_heads, head_dim], so one block - K and V of every layer -
is one contiguous region of `block_bytes`, and consecutive block ids are adjacent.  `plan_regions` turns a
(remote ids -> local ids) mapping into paired (address, length) regions, merging runs that are consecutive on
both sides: one descriptor per run of blocks.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from disagg.protocol import WireMessage


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class TransferError(RuntimeError):
    pass


@dataclass
class KVLayout(WireMessage):
    """What a peer needs to address this worker's KV cache, sent once per pair."""

    TYPE: ClassVar[str] = "kv_layout"
    agent_name: str
    agent_metadata: bytes
    base_addr: int
    num_layers: int
    num_blocks: int
    block_bytes: int  # one block: K and V of every layer
    mem_type: str  # "DRAM" | "VRAM"
    device_id: int

    @classmethod
    def of(cls, kv: torch.Tensor, agent_name: str, agent_metadata: bytes) -> "KVLayout":
        if not kv.is_contiguous():
            raise ValueError("the KV cache must be one contiguous tensor")
        num_blocks, num_layers = kv.shape[0], kv.shape[1]
        return cls(agent_name=agent_name, agent_metadata=agent_metadata, base_addr=kv.data_ptr(),
                   num_layers=num_layers, num_blocks=num_blocks, block_bytes=kv[0].numel() * kv.element_size(),
                   mem_type="VRAM" if kv.is_cuda else "DRAM", device_id=kv.device.index or 0)


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


def plan_regions(src: KVLayout, dst: KVLayout, src_ids: list[int],
                 dst_ids: list[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Paired (addr, len) lists for copying blocks src_ids of `src` into dst_ids of `dst` (all layers)."""
    if (src.num_layers, src.block_bytes) != (dst.num_layers, dst.block_bytes):
        raise TransferError("peers have different KV layouts (layers or block bytes); a pack step is needed")
    for ids, layout in ((src_ids, src), (dst_ids, dst)):
        if any(not 0 <= b < layout.num_blocks for b in ids):
            raise TransferError(f"block id out of range for {layout.agent_name} ({layout.num_blocks} blocks)")
    runs = paired_runs(src_ids, dst_ids)
    src_regions = [(src.base_addr + s * src.block_bytes, n * src.block_bytes) for s, _, n in runs]
    dst_regions = [(dst.base_addr + d * dst.block_bytes, n * dst.block_bytes) for _, d, n in runs]
    return src_regions, dst_regions


class KVTransport(ABC):
    """One per worker. The decode side calls `read`; the prefill side sees the read's notification."""

    bytes_read: int = 0

    @abstractmethod
    def register(self, kv: torch.Tensor) -> None: ...

    @abstractmethod
    def layout(self) -> KVLayout: ...

    @abstractmethod
    def add_peer(self, layout: KVLayout) -> None: ...

    @abstractmethod
    def read(self, peer: str, remote_blocks: list[int], local_blocks: list[int], notify: bytes) -> Any:
        """Start copying the peer's blocks into ours; `notify` reaches the peer when the read completes."""

    @abstractmethod
    def poll(self, handle: Any) -> TransferState: ...

    @abstractmethod
    def release(self, handle: Any) -> None: ...

    @abstractmethod
    def notify(self, peer: str, message: bytes) -> None:
        """Send a message to a peer without moving data (e.g. 'nothing to read, release your blocks')."""

    @abstractmethod
    def notifications(self) -> list[bytes]:
        """Messages peers attached to reads of our memory that have completed since the last call."""
