"""KVTransport over NIXL (UCX backend): DRAM on CPU, VRAM on GPU.

One agent per worker incarnation (its name carries the incarnation, so a restarted worker is a new agent and a
stale PrefillResult can never address the new process's memory).  The KV cache and the CPU tier are registered
once.  Reads are initiated by the reader with a notification that NIXL delivers to the owner when the data has
landed; a read that spans two remote memory types (VRAM cache + DRAM tier on a GPU host) is two NIXL transfers,
and the notification is then sent once both are done.  On CPU, UCX runs over shared memory / TCP on loopback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from disagg.errors import TransferFailed
from disagg.protocol import Tier
from disagg.transfer.base import KVLayout, KVTransport, TransferHandle, TransferState, plan_regions
from disagg.transfer.config import AUTO, TransportConfig

log = logging.getLogger(__name__)

# UCX on a GPU-less host: pick transports that exist here (shared memory, TCP, self) and keep UCX from probing
# for CUDA/IB devices.  setdefault so an operator's own UCX_* settings win.
_CPU_UCX_ENV = {
    "UCX_TLS": "sm,tcp,self",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "UCX_LOG_LEVEL": "error",
}


def detect_net_devices() -> str:
    """Interfaces that are up and carry an IPv4 address, as a UCX device list (loopback last)."""
    import psutil

    stats = psutil.net_if_stats()
    names = [
        name
        for name, addrs in psutil.net_if_addrs().items()
        if name in stats and stats[name].isup and any(a.family == socket.AF_INET for a in addrs)
    ]
    names.sort(key=lambda n: (n == "lo", n))
    return ",".join(names) or "lo"


def apply_ucx_devices(config: TransportConfig) -> str:
    """Set UCX_NET_DEVICES for this process's agents (before the first one is created); returns it."""
    if config.ucx_net_devices != AUTO:
        os.environ["UCX_NET_DEVICES"] = config.ucx_net_devices
    else:
        os.environ.setdefault("UCX_NET_DEVICES", detect_net_devices())
    return os.environ["UCX_NET_DEVICES"]


def _import_nixl():
    try:
        from nixl_cu12 import _api  # the wheel `nixl-cu12` installs
    except ImportError:
        from nixl import _api  # type: ignore[no-redef]  # the `nixl` meta package
    return _api


def nixl_errors() -> tuple[type[Exception], ...]:
    """The exception types NIXL's bindings raise (no common base but Exception): a transfer's failure, e.g.
    NIXL_ERR_REMOTE_DISCONNECT when the peer died while a read was in flight."""
    bindings = _import_nixl().nixlBind
    return tuple(
        cls
        for name, cls in vars(bindings).items()
        if name.startswith("nixl") and name.endswith("Error") and isinstance(cls, type) and issubclass(cls, Exception)
    )


_AGENT_LOCK = threading.Lock()


def make_agent(name: str, progress_delay_us: int) -> Any:
    """A NIXL agent with the UCX backend whose progress thread sleeps up to `progress_delay_us` in poll()."""
    api = _import_nixl()
    with _progress_delay(api.nixlBind, progress_delay_us):
        return api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))


@contextlib.contextmanager
def _progress_delay(bindings: Any, delay_us: int) -> Iterator[None]:
    """nixl_agent's constructor builds its nixlAgentConfig and sets `pthrDelay = 0` itself, with no parameter for
    it; so while this is held, its bindings' config class is one that keeps the larger of that 0 and `delay_us`
    (the bindings' own class, subclassed: nothing else changes).  Under a lock: the swap is global.  A delay of 0
    changes nothing."""
    if delay_us <= 0:
        yield
        return
    base = bindings.nixlAgentConfig

    class _Config(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, key: str, value: Any) -> None:
            if key == "pthrDelay":
                value = max(int(value), delay_us)
            super().__setattr__(key, value)

    with _AGENT_LOCK:
        bindings.nixlAgentConfig = _Config
        try:
            yield
        finally:
            bindings.nixlAgentConfig = base


@dataclass
class _Read(TransferHandle):
    peer: str
    handles: list[Any]  # the NIXL bindings' own transfer handles (untyped there)
    notify: bytes | None  # sent by hand once every transfer is done (multi-transfer reads only)
    done: set[int] = field(default_factory=set)


def _nixl_read(handle: TransferHandle) -> _Read:
    if not isinstance(handle, _Read):
        raise TypeError(f"not a NIXL read: {type(handle).__name__}")
    return handle


class NixlTransport(KVTransport):
    def __init__(self, name: str, device: torch.device | None = None, config: TransportConfig | None = None) -> None:
        if device is None or device.type == "cpu":
            for key, value in _CPU_UCX_ENV.items():
                os.environ.setdefault(key, value)
        config = config or TransportConfig()
        self.net_devices = apply_ucx_devices(config)
        log.info("NIXL agent %s: UCX_NET_DEVICES=%s", name, self.net_devices)
        self.name = name
        self.agent = make_agent(name, config.progress_delay_us)
        self._errors = nixl_errors()
        self._layout: KVLayout | None = None
        self._peers: dict[str, KVLayout] = {}
        self._regs: list[Any] = []
        self.bytes_read = 0
        self.num_reads = 0

    def register(self, kv: torch.Tensor, cpu_tier: torch.Tensor | None = None, fingerprint: str = "") -> None:
        if self._regs:
            raise RuntimeError("KV memory already registered")
        for tensor in filter(lambda t: t is not None, (kv, cpu_tier)):
            reg = self.agent.get_reg_descs(tensor)
            self.agent.register_memory(reg)
            self._regs.append(reg)
        self._layout = KVLayout.of(kv, self.name, self.agent.get_agent_metadata(), cpu_tier, fingerprint)

    def layout(self) -> KVLayout:
        if self._layout is None:
            raise RuntimeError("register the KV cache first")
        return self._layout

    def peer_layouts(self) -> list[KVLayout]:
        return list(self._peers.values())

    def set_peers(self, layouts: list[KVLayout]) -> None:
        wanted = {lay.agent_name: lay for lay in layouts if lay.agent_name != self.name}
        for name in [n for n in self._peers if n not in wanted]:
            self._peers.pop(name)
            try:
                self.agent.remove_remote_agent(name)
            except Exception as exc:  # NIXL raises its own types; a peer already gone is fine
                log.info("removing NIXL peer %s: %s", name, exc)
        for name, lay in wanted.items():
            if name in self._peers:
                continue
            added = self.agent.add_remote_agent(lay.agent_metadata)
            added = added.decode() if isinstance(added, bytes) else added
            if added != name:
                raise TransferFailed(f"peer metadata names {added!r}, layout says {name!r}")
            self._peers[name] = lay

    def read(
        self, peer: str, remote_refs: list[tuple[Tier, int]], local_blocks: list[int], notify: bytes
    ) -> TransferHandle:
        remote = self._peers.get(peer)
        if remote is None:
            raise TransferFailed(f"unknown peer {peer!r}")
        plans = plan_regions(remote, self.layout(), remote_refs, local_blocks)
        if not plans:
            raise TransferFailed("nothing to read")
        local = self.layout().region(Tier.DEVICE)
        single = len(plans) == 1
        read = _Read(peer, [], None if single else notify)
        try:
            for plan in plans:
                local_descs = self.agent.get_xfer_descs([(a, n, local.device_id) for a, n in plan.dst], local.mem_type)
                remote_descs = self.agent.get_xfer_descs(
                    [(a, n, plan.src_device_id) for a, n in plan.src], plan.src_mem_type
                )
                handle = self.agent.initialize_xfer("READ", local_descs, remote_descs, peer, notify if single else b"")
                read.handles.append(handle)
                if self.agent.transfer(handle) == "ERR":
                    raise TransferFailed(f"NIXL read from {peer} failed to post")
        except Exception as exc:  # NIXL raises its own error types from the bindings
            self.release(read)
            if isinstance(exc, TransferFailed):
                raise
            raise TransferFailed(f"NIXL read from {peer} failed to start: {exc}") from exc
        self.num_reads += 1
        self.bytes_read += sum(n for plan in plans for _, n in plan.dst)
        return read

    def poll(self, transfer: TransferHandle) -> TransferState:
        handle = _nixl_read(transfer)
        for i, h in enumerate(handle.handles):
            if i in handle.done:
                continue
            try:
                state = self.agent.check_xfer_state(h)
            except self._errors as exc:  # the peer died mid-read (or UCX gave up on it): the read failed
                log.warning("NIXL read from %s failed: %s", handle.peer, exc)
                return TransferState.FAILED
            if state == "ERR":
                return TransferState.FAILED
            if state != "DONE":
                return TransferState.PENDING
            handle.done.add(i)
        if handle.notify is not None:
            self.notify(handle.peer, handle.notify)
            handle.notify = None
        return TransferState.DONE

    def release(self, transfer: TransferHandle) -> None:
        handle = _nixl_read(transfer)
        for h in handle.handles:
            try:
                self.agent.release_xfer_handle(h)
            except Exception as exc:  # a handle of a failed or dead-peer transfer may refuse release
                log.debug("release of a NIXL handle failed: %s", exc)
        handle.handles = []

    def notify(self, peer: str, message: bytes) -> None:
        if peer not in self._peers:
            raise TransferFailed(f"unknown peer {peer!r}")
        self.agent.send_notif(peer, message)

    def notifications(self) -> list[bytes]:
        return [msg for msgs in self.agent.get_new_notifs().values() for msg in msgs]
