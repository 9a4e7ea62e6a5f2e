"""In-process transports for tests and fault injection (test doubles: the product never imports them).

`LocalTransport`: peers are other LocalTransport objects in the same process (a shared registry); a read copies
the blocks on its first poll.  It lets the engine's KV seam and the worker be tested without NIXL.  It is no
product transport: workers always live in separate processes, and only NIXL reaches another process.

`FaultyTransport`: wraps any transport and makes its next reads fail or hang on demand (the chaos benchmark and
the fault tests inject NIXL read failures and hangs through it; a hung read completes only when released).  A
worker in another process (a Ray actor) gets it by name: `WorkerConfig.transport_wrapper =
"tests.fake_transport:FaultyTransport"`, resolved in that process at start-up (disagg/transfer/factory.py).
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

import torch

from disagg.errors import TransferFailed
from disagg.kv.copier import copy_blocks
from disagg.protocol import Tier
from disagg.transfer.base import KVLayout, KVTransport, TransferHandle, TransferState, plan_regions

_REGISTRY: dict[str, LocalTransport] = {}
_LOCK = threading.Lock()


@dataclass
class _LocalRead(TransferHandle):
    peer: str
    refs: list[tuple[Tier, int]]
    local: list[int]
    notify: bytes
    state: TransferState = TransferState.PENDING


class LocalTransport(KVTransport):
    def __init__(self, name: str, device: torch.device | None = None) -> None:
        self.name = name
        self._tensors: dict[Tier, torch.Tensor] = {}
        self._layout: KVLayout | None = None
        self._peers: dict[str, KVLayout] = {}
        self._notifs: list[bytes] = []
        self.bytes_read = 0
        with _LOCK:
            _REGISTRY[name] = self

    def register(self, kv: torch.Tensor, cpu_tier: torch.Tensor | None = None, fingerprint: str = "") -> None:
        self._tensors[Tier.DEVICE] = kv
        if cpu_tier is not None:
            self._tensors[Tier.CPU] = cpu_tier
        self._layout = KVLayout.of(kv, self.name, self.name.encode(), cpu_tier, fingerprint)

    def layout(self) -> KVLayout:
        if self._layout is None:
            raise RuntimeError("register the KV cache first")
        return self._layout

    def peer_layouts(self) -> list[KVLayout]:
        return list(self._peers.values())

    def set_peers(self, layouts: list[KVLayout]) -> None:
        self._peers = {lay.agent_name: lay for lay in layouts if lay.agent_name != self.name}

    def read(self, peer: str, remote_refs: list[tuple[Tier, int]], local_blocks: list[int], notify: bytes) -> TransferHandle:
        if peer not in self._peers:
            raise TransferFailed(f"unknown peer {peer!r}")
        plan_regions(self._peers[peer], self.layout(), remote_refs, local_blocks)  # same checks as NIXL
        return _LocalRead(peer, list(remote_refs), list(local_blocks), notify)

    def poll(self, transfer: TransferHandle) -> TransferState:
        assert isinstance(transfer, _LocalRead), transfer
        handle = transfer
        if handle.state is TransferState.PENDING:
            with _LOCK:
                owner = _REGISTRY.get(handle.peer)
            if owner is None or handle.peer not in self._peers:
                handle.state = TransferState.FAILED
                return handle.state
            dst = self._tensors[Tier.DEVICE]
            for tier in {t for t, _ in handle.refs}:
                pairs = [(b, d) for (t, b), d in zip(handle.refs, handle.local) if t == tier]
                copy_blocks(owner._tensors[tier], [b for b, _ in pairs], dst, [d for _, d in pairs])
            self.bytes_read += len(handle.local) * self.layout().block_bytes
            owner._notifs.append(handle.notify)
            handle.state = TransferState.DONE
        return handle.state

    def release(self, handle: TransferHandle) -> None:
        pass

    def notify(self, peer: str, message: bytes) -> None:
        with _LOCK:
            owner = _REGISTRY.get(peer)
        if owner is None or peer not in self._peers:
            raise TransferFailed(f"unknown peer {peer!r}")
        owner._notifs.append(message)

    def notifications(self) -> list[bytes]:
        out, self._notifs = self._notifs, []
        return out

    def close(self) -> None:
        with _LOCK:
            _REGISTRY.pop(self.name, None)


class Fault(str, enum.Enum):
    READ_FAIL = "read_fail"  # the read reports FAILED
    READ_HANG = "read_hang"  # the read stays PENDING for `hang_s`, then fails (a peer that stopped answering)


@dataclass
class _Hung(TransferHandle):
    until: float


class FaultyTransport(KVTransport):
    """Delegates to `inner`; `inject(fault, count)` makes the next `count` reads fail or hang."""

    def __init__(self, inner: KVTransport) -> None:
        self.inner = inner
        self._faults: list[tuple[Fault, float]] = []
        self.injected: dict[str, int] = {f.value: 0 for f in Fault}

    def inject(self, fault: Fault | str, count: int = 1, hang_s: float = 30.0) -> None:
        self._faults.extend([(Fault(fault), hang_s)] * count)

    @property
    def bytes_read(self) -> int:  # type: ignore[override]
        return self.inner.bytes_read

    def register(self, kv: torch.Tensor, cpu_tier: torch.Tensor | None = None, fingerprint: str = "") -> None:
        self.inner.register(kv, cpu_tier, fingerprint)

    def layout(self) -> KVLayout:
        return self.inner.layout()

    def peer_layouts(self) -> list[KVLayout]:
        return self.inner.peer_layouts()

    def set_peers(self, layouts: list[KVLayout]) -> None:
        self.inner.set_peers(layouts)

    def read(self, peer: str, remote_refs: list[tuple[Tier, int]], local_blocks: list[int], notify: bytes) -> TransferHandle:
        if self._faults:
            fault, hang_s = self._faults.pop(0)
            self.injected[fault.value] += 1
            if fault is Fault.READ_FAIL:
                raise TransferFailed(f"injected read failure from {peer}")
            return _Hung(time.monotonic() + hang_s)
        return self.inner.read(peer, remote_refs, local_blocks, notify)

    def poll(self, handle: TransferHandle) -> TransferState:
        if isinstance(handle, _Hung):
            return TransferState.PENDING if time.monotonic() < handle.until else TransferState.FAILED
        return self.inner.poll(handle)

    def release(self, handle: TransferHandle) -> None:
        if not isinstance(handle, _Hung):
            self.inner.release(handle)

    def notify(self, peer: str, message: bytes) -> None:
        self.inner.notify(peer, message)

    def notifications(self) -> list[bytes]:
        return self.inner.notifications()

    def close(self) -> None:
        self.inner.close()
