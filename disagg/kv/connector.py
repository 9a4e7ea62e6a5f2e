"""The KV seam: one connector per engine owns both directions of KV besides the device prefix cache.

Named after vLLM v1's KV connector (its scheduler side) and SGLang's KVPoll.

Import (loading).  The scheduler asks one question when it admits a sequence: "past the blocks my device pool
already caches, which leading blocks of this sequence can be *loaded* instead of computed, and from where?"
(`KVConnector.plan`, vLLM's get_num_new_matched_tokens).  The sources (kv/load.py's KVSource) are a peer worker's
memory read over the transport (a prefill worker's result, or a prefix another worker offers) and this worker's
own tiers (CPU memory, disk).  The answer is a `KVLoad`; the scheduler reserves device blocks for it, `start`s it
and parks the sequence in SequenceStatus.WAITING_FOR_KV (a scheduler state, not a side table), polling it every
step:

    plan -> start -> poll: PENDING ... -> DONE     the blocks hold KV; the sequence continues after them
                                       -> FAILED   (error, checksum, deadline) the sequence recomputes
                                                   what did not arrive intact

Ownership of the destination blocks is explicit: while a load is PENDING its blocks may be written by a copy
thread or a remote read, so on FAILED or cancel the connector keeps (`adopts`) the blocks whose write may still
land and frees them once the source says the write is over: no block is reused under a late write, none leaks.

Export (offering).  `request_finished` (as vLLM's: the connector may keep a finished request's blocks) leases a
`hold_kv` request's blocks for the reader and pins a session's blocks in the CPU tier; `export_prefix` leases
the leading blocks of a prompt held on the device or in the CPU tier; `prefill_result` describes a lease for
the reader; `release_lease` (the reader's notification) and `expire_leases` end leases (kv/leases.py).
`on_computed` offers newly computed full blocks to the tiers (write-through, copied off the step's critical path
while the tiers hold a reference on the device blocks), and `drain_events` returns the tiers' stored/removed
events for the router, tagged with their tier.

The engine's pool and sequences are typed by kv/seam.py's Protocols: kv imports nothing from disagg/engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from disagg.config import EngineConfig
from disagg.kv.leases import LeaseTable
from disagg.kv.load import KVLoad, KVSource, KVTiers, LoadState, SourceKind, _Notifier
from disagg.kv.seam import BlockPool, Sequence
from disagg.protocol import FinishReason, KVEvent, PrefillResult, Tier
from disagg.utils import cdiv

__all__ = ["ConnectorStats", "KVConnector", "KVLoad", "KVSource", "KVTiers", "LoadState", "SourceKind", "_Notifier"]


@dataclass
class ConnectorStats:
    loads: dict[str, int] = field(default_factory=dict)  # per source kind
    loaded_blocks: dict[str, int] = field(default_factory=dict)
    failed_loads: dict[str, int] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)
    adopted_blocks: int = 0  # destination blocks held back from reuse because a write might still land
    prefetched_blocks: int = 0


class KVConnector:
    """Both sides of the seam: plans loads from a peer result or the tiers, tracks them, owns adopted blocks
    (import); leases blocks for readers, pins sessions, writes through to the tiers (export).

    `pool` is the engine's block pool; `peer` (a PeerSource) and `tiers` (a KVTiers) are injected (`attach`) and
    either may be None.
    """

    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        peer: KVSource | None = None,
        tiers: KVTiers | None = None,
        load_timeout_s: float = 10.0,
        lease_timeout_s: float = 30.0,
        probe_every: int = EngineConfig.kv_probe_every,
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.peer: KVSource | None = None
        self.tiers: KVTiers | None = None
        self.load_timeout_s = load_timeout_s
        self.leases = LeaseTable(pool, lease_timeout_s)  # blocks a peer is about to read
        self.attach(peer, tiers)
        self.stats = ConnectorStats()
        self._adopted: list[tuple[KVSource, KVLoad, list[int]]] = []  # blocks freed once the source settles
        self._prefetches: list[KVLoad] = []
        self.recompute_s_per_block: float | None = None  # measured by the engine (prefill time per block)
        self.probe_every = probe_every
        self._skipped_slow = 0

    def attach(self, peer: KVSource | None = None, tiers: KVTiers | None = None) -> None:
        """Inject the KV sources: a PeerSource (reads over the worker's transport) and/or the tiers."""
        self.peer = peer
        self.tiers = tiers
        self.leases.release_cpu = tiers.release_export if tiers is not None else None

    # ------------------------------------------------------------------ import: planning
    def plan(self, seq: Sequence, num_hit_blocks: int) -> KVLoad | None:
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
        measured = self.tiers.load_s_per_block.get(tier) if self.tiers is not None else None
        if measured is None or self.recompute_s_per_block is None or measured < self.recompute_s_per_block:
            return True
        self._skipped_slow += 1  # every so often load anyway, so the measurement can recover
        return self._skipped_slow % self.probe_every == 0

    def _plan_peer(self, seq: Sequence, num_hit_blocks: int) -> KVLoad | None:
        result = seq.remote
        assert result is not None  # plan() routes only sequences with a peer's result here
        total = cdiv(result.num_tokens, self.block_size)
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
            remote=result,
        )

    def remote_without_read(self, seq: Sequence) -> None:
        """Every block a peer offered was cached here already: let the owner release its lease."""
        if isinstance(self.peer, _Notifier) and seq.remote is not None:
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

    def _finish_prefetches(self, tiers: KVTiers) -> None:
        still = []
        for load in self._prefetches:
            state = tiers.poll(load)
            if state is LoadState.PENDING and time.monotonic() <= load.deadline:
                still.append(load)
                continue
            if state is LoadState.PENDING and not tiers.abandon(load):
                self._adopt(load, load.dst_block_ids)
                continue
            ok = load.num_ok_blocks if state is LoadState.DONE else 0
            if ok:
                self.pool.cache_blocks(load.dst_block_ids[:ok], load.block_hashes[:ok], load.parent_hash)
            self.pool.free(load.dst_block_ids)  # now cached-free: the request's admission finds them
            self.stats.prefetched_blocks += ok
        self._prefetches = still

    # ------------------------------------------------------------------ import: running loads
    def source(self, load: KVLoad) -> KVSource:
        src: KVSource | None = self.peer if load.kind is SourceKind.PEER else self.tiers
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

    # ------------------------------------------------------------------ export: write-through, upkeep
    def on_computed(self, block_ids: list[int], block_hashes: list[int]) -> None:
        """Full blocks whose KV was just computed (or loaded from a peer): offer them to the tiers."""
        if self.tiers is not None and block_ids:
            self.tiers.store(block_ids, block_hashes)

    def tick(self) -> None:
        for src in filter(None, (self.peer, self.tiers)):
            src.tick()
        if self._prefetches and self.tiers is not None:
            self._finish_prefetches(self.tiers)
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

    # ------------------------------------------------------------------ export: leases and pins
    def request_finished(self, seq: Sequence) -> bool:
        """A request is done: pin its session's blocks in the CPU tier (kv_retention_s), and lease its blocks for
        the reader if it holds KV for one.  True when the connector took the blocks (leased: the caller must not
        free them)."""
        if seq.kv_retention_s and seq.session_id and self.tiers is not None:
            seq.update_block_hashes()
            pinned = seq.block_hashes[: seq.num_registered_blocks]
            self.tiers.pin(seq.session_id, pinned, seq.kv_retention_s, tenant=seq.tenant)
        if not seq.hold_kv:
            return False
        # the KV of every token but the last sampled one is in the blocks (the last has no KV yet)
        self.leases.hold(seq.request_id, seq.block_ids, seq.num_tokens - 1)
        return True

    def prefill_result(
        self,
        request_id: str,
        agent_name: str,
        first_token: int,
        finish_reason: str | None,
        num_cached_tokens: int = 0,
        first_logprobs: list | None = None,
    ) -> PrefillResult:
        """Describe a finished hold_kv request's leased blocks for the reader."""
        lease = self.leases.leases[request_id]
        return PrefillResult(
            request_id=request_id,
            agent_name=agent_name,
            block_ids=list(lease.block_ids),
            regions=list(lease.regions),
            num_tokens=lease.num_tokens,
            first_token=first_token,
            finish_reason=FinishReason(finish_reason) if finish_reason is not None else None,
            num_cached_tokens=num_cached_tokens,
            first_logprobs=first_logprobs,
        )

    def export_prefix(self, request_id: str, block_hashes: list[int], agent_name: str) -> PrefillResult | None:
        """Lease the leading `block_hashes` this worker holds on the device or in its CPU tier, for a peer to
        read instead of recomputing them; None if it holds none."""
        hits = self.pool.lookup_prefix(block_hashes)
        self.pool.touch(hits)
        slots = self.tiers.export(block_hashes[len(hits) :]) if self.tiers is not None else []
        if not hits and not slots:
            return None
        regions = [Tier.DEVICE] * len(hits) + [Tier.CPU] * len(slots)
        n = len(hits) + len(slots)
        self.leases.hold(request_id, hits + slots, n * self.block_size, regions=regions)
        return PrefillResult(request_id, agent_name, hits + slots, regions, n * self.block_size)

    def release_lease(self, request_id: str) -> bool:
        """The reader is done with a lease (its notification), or gave up on it: free its blocks now."""
        return self.leases.release(request_id)

    def expire_leases(self, now: float | None = None) -> list[str]:
        """End the leases whose reader vanished (past their TTL)."""
        return self.leases.expire(now)
