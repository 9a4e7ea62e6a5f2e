"""KVTransport over NIXL (UCX backend): DRAM on CPU, VRAM on GPU.

One agent per worker; the whole KV tensor is registered once.  Reads are initiated by the decode side with a
notification that NIXL delivers to the prefill side when the data has landed.  On CPU, UCX runs over shared
memory / TCP on loopback; the defaults below are what was verified to work between processes on one host.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from disagg.transfer.base import KVLayout, KVTransport, TransferError, TransferState, plan_regions

# UCX on a GPU-less host: pick transports that exist here (shared memory, TCP, self) and keep UCX from probing
# for CUDA/IB devices.  setdefault so an operator's own UCX_* settings win.
_CPU_UCX_ENV = {"UCX_TLS": "sm,tcp,self", "UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n",
                "UCX_LOG_LEVEL": "error"}


def _import_nixl():
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config  # the wheel `nixl-cu12` installs
    except ImportError:
        from nixl._api import nixl_agent, nixl_agent_config  # the `nixl` meta package
    return nixl_agent, nixl_agent_config


class NixlTransport(KVTransport):
    def __init__(self, name: str, device: torch.device | None = None) -> None:
        if device is None or device.type == "cpu":
            for key, value in _CPU_UCX_ENV.items():
                os.environ.setdefault(key, value)
        nixl_agent, nixl_agent_config = _import_nixl()
        self.name = name
        self.agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
        self._layout: KVLayout | None = None
        self._peers: dict[str, KVLayout] = {}
        self._reg = None
        self.bytes_read = 0
        self.num_reads = 0

    def register(self, kv: torch.Tensor) -> None:
        if self._reg is not None:
            raise RuntimeError("KV cache already registered")
        self._reg = self.agent.get_reg_descs(kv)
        self.agent.register_memory(self._reg)
        self._layout = KVLayout.of(kv, self.name, self.agent.get_agent_metadata())

    def layout(self) -> KVLayout:
        if self._layout is None:
            raise RuntimeError("register the KV cache first")
        return self._layout

    def add_peer(self, layout: KVLayout) -> None:
        if layout.agent_name in self._peers:
            return
        name = self.agent.add_remote_agent(layout.agent_metadata)
        name = name.decode() if isinstance(name, bytes) else name
        if name != layout.agent_name:
            raise TransferError(f"peer metadata names {name!r}, layout says {layout.agent_name!r}")
        self._peers[name] = layout

    def remove_peer(self, name: str) -> None:
        if self._peers.pop(name, None) is not None:
            self.agent.remove_remote_agent(name)

    def read(self, peer: str, remote_blocks: list[int], local_blocks: list[int], notify: bytes) -> Any:
        remote = self._peers.get(peer)
        if remote is None:
            raise TransferError(f"unknown peer {peer!r}")
        local = self.layout()
        src, dst = plan_regions(remote, local, remote_blocks, local_blocks)
        if not src:
            raise TransferError("nothing to read")
        local_descs = self.agent.get_xfer_descs([(a, n, local.device_id) for a, n in dst], local.mem_type)
        remote_descs = self.agent.get_xfer_descs([(a, n, remote.device_id) for a, n in src], remote.mem_type)
        try:
            handle = self.agent.initialize_xfer("READ", local_descs, remote_descs, peer, notify)
            state = self.agent.transfer(handle)
        except Exception as exc:  # NIXL raises its own error types from the bindings
            raise TransferError(f"NIXL read from {peer} failed to start: {exc}") from exc
        if state == "ERR":
            self.agent.release_xfer_handle(handle)
            raise TransferError(f"NIXL read from {peer} failed to post")
        self.num_reads += 1
        self.bytes_read += sum(n for _, n in dst)
        return handle

    def poll(self, handle: Any) -> TransferState:
        state = self.agent.check_xfer_state(handle)
        if state == "DONE":
            return TransferState.DONE
        if state == "ERR":
            return TransferState.FAILED
        return TransferState.PENDING

    def release(self, handle: Any) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception:  # a handle of a failed or dead-peer transfer may refuse release; nothing leaks locally
            pass

    def notify(self, peer: str, message: bytes) -> None:
        if peer not in self._peers:
            raise TransferError(f"unknown peer {peer!r}")
        self.agent.send_notif(peer, message)

    def notifications(self) -> list[bytes]:
        return [msg for msgs in self.agent.get_new_notifs().values() for msg in msgs]
