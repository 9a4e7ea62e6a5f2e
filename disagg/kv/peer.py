"""PeerSource: KV blocks read from another worker's memory (its device cache or its CPU tier) over the transport.

The sequence carries the owner's `PrefillResult` (which blocks, in which of its regions, covering how many
tokens); the load reads the blocks the local device cache does not already hold, with the request id as the
NIXL notification so the owner releases its lease when the data has landed.

A read that fails is simply over.  A read abandoned while still PENDING (past its deadline, or the request was
cancelled) may still complete and write into the destination blocks, so the connector keeps those blocks until
the transfer settles: DONE or FAILED, or the peer is removed from the agent (which fails its transfers), or
`orphan_timeout_s` passes (then the handle is released and the blocks freed, logged).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from disagg.errors import TransferFailed
from disagg.kv.load import KVLoad, LoadHandle, LoadState, SourceKind, _Notifier, handle_if_started, handle_of
from disagg.protocol import PrefillResult
from disagg.transfer.base import KVTransport, TransferHandle, TransferState

log = logging.getLogger(__name__)


@dataclass
class _PeerRead(LoadHandle):
    result: PrefillResult
    transfer: TransferHandle | None = None  # None until the transport posted the read
    abandoned_at: float | None = None
    released: bool = False

    @property
    def posted(self) -> TransferHandle:
        assert self.transfer is not None, "a peer read polled before it was posted"
        return self.transfer


class PeerSource(_Notifier):
    kind = SourceKind.PEER

    def __init__(self, transport: KVTransport, orphan_timeout_s: float = 60.0) -> None:
        self.transport = transport
        self.orphan_timeout_s = orphan_timeout_s
        self.num_reads = 0
        self.num_failures = 0
        self.read_seconds = 0.0
        self.num_notify_only = 0

    def start(self, load: KVLoad) -> None:
        result = load.remote
        assert result is not None, "a peer load carries the owner's offer (KVConnector._plan_peer)"
        read = _PeerRead(result)
        load.handle = read
        first = load.first_block
        refs = list(
            zip(result.regions[first : first + load.num_blocks], result.block_ids[first : first + load.num_blocks])
        )
        try:
            read.transfer = self.transport.read(result.agent_name, refs, load.dst_block_ids, load.request_id.encode())
        except TransferFailed:
            self.num_failures += 1
            raise
        self.num_reads += 1

    def poll(self, load: KVLoad) -> LoadState:
        read = handle_of(load, _PeerRead)
        state = self.transport.poll(read.posted)
        if state is TransferState.PENDING:
            return LoadState.PENDING
        self._release(read)
        if state is TransferState.DONE:
            load.num_ok_blocks = load.num_blocks
            self.read_seconds += time.monotonic() - load.started
            return LoadState.DONE
        self.num_failures += 1
        load.num_ok_blocks = 0
        return LoadState.FAILED

    def abandon(self, load: KVLoad) -> bool:
        read = handle_if_started(load, _PeerRead)
        if read is None or read.transfer is None or read.released:
            return True
        if self.transport.poll(read.transfer) is not TransferState.PENDING:
            self._release(read)
            return True
        read.abandoned_at = time.monotonic()
        self.num_failures += 1
        return False

    def settled(self, load: KVLoad) -> bool:
        read = handle_of(load, _PeerRead)
        if read.released:
            return True
        if self.transport.poll(read.posted) is not TransferState.PENDING:
            self._release(read)
            return True
        if time.monotonic() - (read.abandoned_at or 0.0) > self.orphan_timeout_s:
            log.warning(
                "KV read from %s for %s never settled; releasing its handle and blocks",
                read.result.agent_name,
                load.request_id,
            )
            self._release(read)
            return True
        return False

    def _release(self, read: _PeerRead) -> None:
        if not read.released:
            if read.transfer is not None:
                self.transport.release(read.transfer)
            read.released = True

    def notify_done(self, result: PrefillResult, request_id: str) -> None:
        """Every block was already cached here: tell the owner it can let go of its lease."""
        self.num_notify_only += 1
        try:
            self.transport.notify(result.agent_name, request_id.encode())
        except TransferFailed as exc:  # the owner is gone; its lease dies with it
            log.info("could not notify %s for %s: %s", result.agent_name, request_id, exc)
