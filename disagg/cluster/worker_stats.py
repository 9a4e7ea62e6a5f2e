"""The one assembly of a worker's figures (`WorkerStats`, disagg/protocol.py): heartbeats carry it to the router
(load checks, planner, /metrics) and the worker's `stats()` call answers with it.

Runs on the worker's engine thread (it reads engine, scheduler, connector, transport and tier state that only
that thread changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from disagg.protocol import CorruptReason, SourceKind, Tier
from disagg.stats import WorkerStats

if TYPE_CHECKING:  # types only: the router process imports this module's package without torch
    from disagg.engine.engine import LLMEngine
    from disagg.kv.peer import PeerSource
    from disagg.kv.store import TieredStore
    from disagg.transfer.base import KVTransport

_TIERS = (Tier.CPU, Tier.DISK)  # the tiers behind the device cache; each one reported, zeros included


@dataclass
class LoopCounts:
    """What the worker's step loop counts itself (the engine does not see these)."""

    step_failures: int = 0
    events_published: int = 0


def worker_stats(
    engine: LLMEngine,
    transport: KVTransport,
    peer: PeerSource,
    tiers: TieredStore | None,
    loop: LoopCounts,
    steps: int,
) -> WorkerStats:
    s, c, pool, sched = engine.scheduler.stats, engine.connector.stats, engine.pool, engine.scheduler
    stats = WorkerStats(
        steps=steps,
        generated_tokens=engine.stats.generated_tokens,
        preemptions=s.num_preemptions,
        prefix_query_tokens=s.prefix_query_tokens,
        prefix_hit_tokens=s.prefix_hit_tokens,
        loaded_tokens=s.loaded_tokens,
        failed_loads=s.failed_loads,
        leases_expired=engine.connector.leases.num_expired,
        transfer_bytes=transport.bytes_read,
        transfer_reads=peer.num_reads,
        transfer_failures=peer.num_failures,
        transfer_seconds=peer.read_seconds,
        local_only_imports=peer.num_notify_only,
        step_failures=loop.step_failures,
        events_published=loop.events_published,
        loaded_blocks={SourceKind(kind): n for kind, n in c.loaded_blocks.items()},
        kv_blocks_total=pool.num_blocks,
        kv_blocks_free=pool.num_free_blocks,
        kv_blocks_cached=pool.num_cached_blocks,
        running=len(sched.running),
        waiting=len(sched.waiting),
        loading=len(sched.loading),
        leases=len(engine.connector.leases.leases),
        adopted_blocks=engine.connector.num_adopted_blocks,
        prefill_s_per_token=engine.prefill_s_per_token,
        step_s_per_token=engine.step_s_per_token,
    )
    stats.set_timing(engine.step_fit.model, engine.chunk_rule)
    kv = engine.kv_tensor
    if transport.bytes_read and kv is not None:  # seconds per block read, from this worker's peer reads
        stats.transfer_s_per_block = peer.read_seconds / (transport.bytes_read / (kv[0].numel() * kv.element_size()))
    if engine.speculator is not None:
        spec = engine.speculator.stats
        stats.spec_proposed_tokens, stats.spec_accepted_tokens = spec.proposed_tokens, spec.accepted_tokens
        stats.spec_fallbacks = spec.fallbacks
    if tiers is not None:
        _add_tiers(stats, tiers)
    return stats


def _add_tiers(stats: WorkerStats, tiers: TieredStore) -> None:
    t = tiers.stats
    stats.tier_query_blocks = t.query_blocks
    stats.tier_hit_blocks = {tier: t.hit_blocks.get(tier, 0) for tier in _TIERS}
    stats.tier_loaded_blocks = {tier: t.loaded_blocks.get(tier, 0) for tier in _TIERS}
    stats.tier_stored_blocks = {tier: t.stored_blocks.get(tier, 0) for tier in _TIERS}
    stats.tier_bytes_stored = {tier: t.bytes_stored.get(tier, 0) for tier in _TIERS}
    stats.tier_bytes_loaded = {tier: t.bytes_loaded.get(tier, 0) for tier in _TIERS}
    stats.tier_evictions = {tier: t.evictions.get(tier, 0) for tier in _TIERS}
    stats.tier_load_seconds = {tier: float(t.load_seconds.get(tier, 0.0)) for tier in _TIERS}
    stats.tier_loads = {tier: t.loads.get(tier, 0) for tier in _TIERS}
    stats.tier_corrupt = {reason: t.corrupt.get(reason, 0) for reason in CorruptReason}
    stats.tier_write_failures = t.write_failures
    stats.tier_store_skipped = t.store_skipped
    g = tiers.gauges()  # the disk figures are None without a disk tier
    stats.tier_cpu_blocks = g.cpu_blocks
    stats.tier_cpu_capacity_blocks = g.cpu_capacity_blocks
    stats.tier_pinned_blocks = g.pinned_blocks
    stats.tier_pinned_sessions = g.pinned_sessions
    stats.tier_stores_in_flight = g.stores_in_flight
    stats.tier_demotions_in_flight = g.demotions_in_flight
    stats.tier_disk_blocks = g.disk_blocks
    stats.tier_disk_bytes = g.disk_bytes
    stats.tier_disk_capacity_bytes = g.disk_capacity_bytes
    stats.tier_load_s_per_block = dict(tiers.load_s_per_block)
