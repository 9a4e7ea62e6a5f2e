"""The KV seam: where a sequence's KV blocks come from besides the device prefix cache, and where they go.

The scheduler asks one question when it admits a sequence: "past the blocks my device pool already caches,
which leading blocks of this sequence can be *loaded* instead of computed, and from where?"
(`KVConnector.plan`).  The sources are a peer worker's memory read over the transport (a prefill worker's
result, or a prefix another worker offers) and this worker's own tiers (CPU memory, disk).  The answer is a
`KVLoad`; the scheduler reserves device blocks for it, `start`s it and parks the sequence in
SequenceStatus.WAITING_FOR_KV (a scheduler state, not a side table), polling it every step:

    plan -> start -> poll: PENDING ... -> DONE     the blocks hold KV; the sequence continues after them
                                       -> FAILED   (error, checksum, deadline) the sequence recomputes
                                                   what did not arrive intact

Ownership of the destination blocks is explicit: while a load is PENDING its blocks may be written by a copy
thread or a remote read, so on FAILED or cancel the connector keeps (`adopts`) the blocks whose write may still
land and frees them once the source says the write is over: no block is reused under a late write, none leaks.

Going out: `on_computed` offers newly computed full blocks to the tiers (write-through, copied off the step's
critical path while the connector holds a reference on the device blocks), and `drain_events` returns the
tiers' stored/removed events for the router, tagged with their tier.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from disagg.protocol import KVEvent, SourceKind, Tier  # SourceKind: also a WorkerStats label


class LoadState(enum.Enum):
    """What the scheduler sees when it polls a load (SGLang's KVPoll, reduced to what a scheduler acts on)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass
class KVLoad:
    """One in-flight load of some of a sequence's blocks into its device blocks."""

    request_id: str
    kind: SourceKind
    first_block: int  # index in the sequence's block list of the first loaded block
    num_blocks: int
    num_tokens: int  # the sequence's computed tokens once every block has arrived
    deadline: float
    block_hashes: list[int] = field(default_factory=list)  # tier loads: hashes of the loaded blocks
    tiers: list[Tier] = field(default_factory=list)  # tier loads: where each block comes from
    dst_block_ids: list[int] = field(default_factory=list)  # set by the scheduler before start
    started: float = field(default_factory=time.monotonic)
    state: LoadState = LoadState.PENDING
    num_ok_blocks: int = 0  # leading blocks that arrived intact (== num_blocks on full success)
    first_token: int | None = None  # a peer's prefill result: the token it sampled after these blocks
    handle: Any = None  # the source's own state
    accounted: bool = False  # counted in ConnectorStats
    parent_hash: int | None = None  # hash of the block before the first loaded one (prefetch: for its event)


class KVSource(ABC):
    """A place KV blocks are loaded from into the device cache."""

    kind: SourceKind

    @abstractmethod
    def start(self, load: KVLoad) -> None:
        """Issue the copy/read of `load` into `load.dst_block_ids`."""

    @abstractmethod
    def poll(self, load: KVLoad) -> LoadState:
        """Progress the load; on DONE/FAILED `load.num_ok_blocks` says how many leading blocks are intact."""

    @abstractmethod
    def abandon(self, load: KVLoad) -> bool:
        """Give up on a load (failed past its deadline, or cancelled). True if its destination blocks can be
        reused now; False if a write may still land (the connector then keeps them until `settled`)."""

    def settled(self, load: KVLoad) -> bool:
        """For an abandoned load whose blocks were kept: True once no write can land any more."""
        return True

    def tick(self) -> None:  # noqa: B027 - optional hook: most sources have no background work
        """Background progress (stores, demotions, expiries); called once per engine tick."""


@dataclass
class ConnectorStats:
    loads: dict[str, int] = field(default_factory=dict)  # per source kind
    loaded_blocks: dict[str, int] = field(default_factory=dict)
    failed_loads: dict[str, int] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)
    adopted_blocks: int = 0  # destination blocks held back from reuse because a write might still land
    prefetched_blocks: int = 0


class _Notifier(KVSource):
    """A source that can tell a peer 'nothing to read' (PeerSource)."""

    @abstractmethod
    def notify_done(self, result: Any, request_id: str) -> None: ...


class KVConnector:
    """Scheduler side of the seam: plans loads from a peer result or the tiers, tracks them, owns adopted blocks.

    `pool` is the engine's BlockPool; `peer` (a PeerSource) and `tiers` (a TieredStore) are injected and either
    may be None.
    """

    def __init__(
        self, pool: Any, block_size: int, peer: KVSource | None = None, tiers: Any = None, load_timeout_s: float = 10.0
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.peer = peer
        self.tiers = tiers
        self.load_timeout_s = load_timeout_s
        self.stats = ConnectorStats()
        self._adopted: list[tuple[KVSource, KVLoad, list[int]]] = []  # blocks freed once the source settles
        self._prefetches: list[KVLoad] = []
        self.recompute_s_per_block: float | None = None  # measured by the engine (prefill time per block)
        self.probe_every = 50
        self._skipped_slow = 0

    # ------------------------------------------------------------------ planning
    def plan(self, seq: Any, num_hit_blocks: int) -> KVLoad | None:
        """A load for the blocks of `seq` after its `num_hit_blocks` device hits, or None."""
        if seq.remote is not None:
            return self._plan_peer(seq, num_hit_blocks)
        if self.tiers is None or seq.tier_load_failed:  # after a failed tier load, compute (never retry it)
            return None
        usable = (seq.num_tokens - 1) // self.block_size  # leave one token to compute (it yields the logits)
        hashes = seq.block_hashes[num_hit_blocks:usable]
        tiers = self.tiers.lookup(hashes)
        n = next((i for i, t in enumerate(tiers) if not self.worth_loading(t)), len(tiers))
        if n == 0:
            return None
        return KVLoad(
            seq.request_id,
            SourceKind.TIERS,
            num_hit_blocks,
            n,
            (num_hit_blocks + n) * self.block_size,
            time.monotonic() + self.load_timeout_s,
            block_hashes=hashes[:n],
            tiers=tiers,
        )

    def worth_loading(self, tier: Tier) -> bool:
        """A tier whose measured load time per block is above recomputing a block is not worth loading from."""
        measured = self.tiers.load_s_per_block.get(tier)
        if measured is None or self.recompute_s_per_block is None or measured < self.recompute_s_per_block:
            return True
        self._skipped_slow += 1  # every so often load anyway, so the measurement can recover
        return self._skipped_slow % self.probe_every == 0

    def _plan_peer(self, seq: Any, num_hit_blocks: int) -> KVLoad | None:
        result = seq.remote
        total = -(-result.num_tokens // self.block_size)
        if num_hit_blocks >= total:
            return None
        return KVLoad(
            seq.request_id,
            SourceKind.PEER,
            num_hit_blocks,
            total - num_hit_blocks,
            result.num_tokens,
            time.monotonic() + self.load_timeout_s,
            first_token=result.first_token,
            handle=result,
        )

    def remote_without_read(self, seq: Any) -> None:
        """Every block a peer offered was cached here already: let the owner release its lease."""
        if isinstance(self.peer, _Notifier):
            self.peer.notify_done(seq.remote, seq.request_id)

    def prefetch(self, block_hashes: list[int]) -> int:
        """Bring the tier-resident blocks after the device-cached prefix of `block_hashes` back into the device
        prefix cache ahead of their request's admission (a pinned session's next turn).  Only uses up to half
        of the free blocks; returns the number of blocks being loaded."""
        if self.tiers is None:
            return 0
        hits = self.pool.lookup_prefix(block_hashes)
        n_dev = len(hits)
        hashes = block_hashes[n_dev:]
        tiers = self.tiers.lookup(hashes, count=False)
        if not tiers:
            return 0
        self.pool.touch(hits)  # so the allocation below cannot evict the prefix it continues
        n = min(len(tiers), self.pool.num_free_blocks // 2)
        dst = self.pool.allocate(n) if n else []
        self.pool.free(hits)
        if not n:
            return 0
        load = KVLoad(
            f"prefetch-{n_dev}-{hashes[0]:x}",
            SourceKind.TIERS,
            n_dev,
            n,
            0,
            time.monotonic() + self.load_timeout_s,
            block_hashes=hashes[:n],
            tiers=tiers[:n],
            dst_block_ids=dst,
            parent_hash=block_hashes[n_dev - 1] if n_dev else None,
        )
        self.tiers.start(load)
        self._prefetches.append(load)
        return n

    def _finish_prefetches(self) -> None:
        still = []
        for load in self._prefetches:
            state = self.tiers.poll(load)
            if state is LoadState.PENDING and time.monotonic() <= load.deadline:
                still.append(load)
                continue
            if state is LoadState.PENDING and not self.tiers.abandon(load):
                self._adopt(load, load.dst_block_ids)
                continue
            ok = load.num_ok_blocks if state is LoadState.DONE else 0
            if ok:
                self.pool.cache_blocks(load.dst_block_ids[:ok], load.block_hashes[:ok], load.parent_hash)
            self.pool.free(load.dst_block_ids)  # now cached-free: the request's admission finds them
            self.stats.prefetched_blocks += ok
        self._prefetches = still

    # ------------------------------------------------------------------ running loads
    def source(self, load: KVLoad) -> KVSource:
        src = self.peer if load.kind is SourceKind.PEER else self.tiers
        if src is None:
            raise RuntimeError(f"no {load.kind.value} source configured")
        return src

    def start(self, load: KVLoad) -> None:
        kind = load.kind.value
        self.stats.loads[kind] = self.stats.loads.get(kind, 0) + 1
        try:
            self.source(load).start(load)
        except Exception:  # a source that cannot even start fails like any other load: the caller recomputes
            load.state = LoadState.FAILED
            load.num_ok_blocks = 0
            raise

    def poll(self, load: KVLoad) -> LoadState:
        if load.state is LoadState.PENDING:
            load.state = self.source(load).poll(load)
            if load.state is LoadState.PENDING and time.monotonic() > load.deadline:
                load.state = LoadState.FAILED
                load.num_ok_blocks = 0
        if load.state is not LoadState.PENDING:
            self._account(load)
        return load.state

    def _account(self, load: KVLoad) -> None:
        if load.accounted:
            return
        load.accounted = True
        kind = load.kind.value
        self.stats.loaded_blocks[kind] = self.stats.loaded_blocks.get(kind, 0) + load.num_ok_blocks
        self.stats.load_seconds[kind] = self.stats.load_seconds.get(kind, 0.0) + time.monotonic() - load.started
        if load.state is LoadState.FAILED or load.num_ok_blocks < load.num_blocks:
            self.stats.failed_loads[kind] = self.stats.failed_loads.get(kind, 0) + 1

    def release_failed(self, load: KVLoad) -> bool:
        """After FAILED (or a partial DONE): may the sequence reuse the blocks that did not arrive? If not, the
        connector adopts them (the caller must drop them from the sequence without freeing)."""
        tail = load.dst_block_ids[load.num_ok_blocks :]
        if not tail:
            return True
        if self.source(load).abandon(load):
            return True
        self._adopt(load, tail)
        return False

    def cancel(self, load: KVLoad) -> None:
        """The sequence is aborted mid-load: the connector takes over every destination block."""
        if load.state is LoadState.PENDING and not self.source(load).abandon(load):
            self._adopt(load, list(load.dst_block_ids))
        else:
            self.pool.free(load.dst_block_ids)
        load.state = LoadState.FAILED

    def _adopt(self, load: KVLoad, block_ids: list[int]) -> None:
        self._adopted.append((self.source(load), load, block_ids))
        self.stats.adopted_blocks += len(block_ids)

    # ------------------------------------------------------------------ writes and upkeep
    def on_computed(self, block_ids: list[int], block_hashes: list[int]) -> None:
        """Full blocks whose KV was just computed (or loaded from a peer): offer them to the tiers."""
        if self.tiers is not None and block_ids:
            self.tiers.store(block_ids, block_hashes)

    def tick(self) -> None:
        for src in filter(None, (self.peer, self.tiers)):
            src.tick()
        if self._prefetches:
            self._finish_prefetches()
        if self._adopted:
            still = []
            for src, load, blocks in self._adopted:
                if src.settled(load):
                    self.pool.free(blocks)
                    self.stats.adopted_blocks -= len(blocks)
                else:
                    still.append((src, load, blocks))
            self._adopted = still

    @property
    def num_adopted_blocks(self) -> int:
        return sum(len(b) for _, _, b in self._adopted)

    def drain_events(self) -> list[KVEvent]:
        return self.tiers.drain_events() if self.tiers is not None else []
