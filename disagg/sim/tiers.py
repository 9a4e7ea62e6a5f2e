"""CPU and disk tiers for simulated workers, in virtual time: the TieredStore's bookkeeping - the pure tier index
(disagg/kv/tier_index.py: lookup, LRU, pins per session with a TTL and a budget, events) - with nothing to move:
write-through to CPU and LRU demotion to disk happen at once, and load times come from the time model
(calibrated against the real TieredStore by `disagg bench calibrate`).  The engine's KV connector drives it
exactly as it drives the real store: lookup, start, poll, store, pin, events.

Where the simulated tiers differ from the store (kept as they were, the golden runs depend on them): a store
fills the CPU tier past its size and then demotes the least recently used unpinned blocks straight to disk (the
store keeps free slots by demoting in the background, and drops a block when a store finds no free slot); a
store touches blocks already in CPU; disk capacity counts blocks, and a block demoted again is refreshed there
(`TierIndex.demote_to_disk`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from disagg.kv.load import KVLoad, KVTiers, LoadHandle, LoadState, handle_of
from disagg.kv.tier_config import TierConfig, TierGauges, TierStats
from disagg.kv.tier_index import LruBlocks, TierIndex
from disagg.protocol import KVEvent, Tier


@dataclass
class LandsAt(LoadHandle):
    """A simulated load's state: the virtual time its blocks have arrived (tier loads and peer reads alike)."""

    at: float


class SimTiers(KVTiers):
    def __init__(
        self,
        cpu_blocks: int,
        disk_blocks: int,
        cpu_s: float,
        disk_s: float,
        clock: Callable[[], float],
        at: Callable[[float, Callable[[], None]], None],
        wake: Callable[[], None],
        pin_budget_fraction: float = TierConfig.pin_budget_fraction,
        tenant_pin_share: float = TierConfig.tenant_pin_share,
    ) -> None:
        self.cpu_blocks, self.disk_blocks = cpu_blocks, disk_blocks
        pin_budget = int(cpu_blocks * pin_budget_fraction)
        self.index = TierIndex(LruBlocks(), LruBlocks(disk_blocks), pin_budget, tenant_pin_share)
        self.load_s_per_block = {Tier.CPU: cpu_s, Tier.DISK: disk_s}
        self._clock, self._at, self._wake = clock, at, wake

    @property
    def stats(self) -> TierStats:
        return self.index.stats

    @property
    def disk(self) -> LruBlocks:
        """The disk tier's index: a restarted worker finds it again (the simulated cluster hands it over)."""
        assert self.index.disk is not None
        return self.index.disk

    @disk.setter
    def disk(self, blocks: LruBlocks) -> None:
        self.index.disk = blocks

    # ------------------------------------------------------------------ lookups and loads
    def lookup(self, block_hashes: list[int], count: bool = True) -> list[Tier]:
        return self.index.lookup(block_hashes, count)

    def start(self, load: KVLoad) -> None:
        seconds = sum(self.load_s_per_block[t] for t in load.tiers)
        landing = LandsAt(self._clock() + seconds)
        load.handle = landing
        for h in load.block_hashes:
            self.index.cpu.touch(h)
        self._at(landing.at, self._wake)

    def poll(self, load: KVLoad) -> LoadState:
        if self._clock() < handle_of(load, LandsAt).at:
            return LoadState.PENDING
        load.num_ok_blocks = len(load.block_hashes)
        for t in load.tiers:
            self.stats.loaded_blocks[t] += 1
        return LoadState.DONE

    def abandon(self, load: KVLoad) -> bool:
        return True

    # ------------------------------------------------------------------ stores, demotion, pins
    def store(self, block_ids: list[int], block_hashes: list[int]) -> None:
        cpu, stored = self.index.cpu, []
        for h in block_hashes:
            if h in cpu:
                cpu.touch(h)
                continue
            cpu.add(h)
            stored.append(h)
        if stored:
            self.index.stored(Tier.CPU, stored)
        demoted = self.index.cpu_victims(len(cpu) - self.cpu_blocks)  # past the size: LRU unpinned blocks leave
        if not demoted:
            return
        self.index.drop_cpu(demoted)
        if self.disk_blocks:
            self.index.demote_to_disk(demoted)

    def pin(
        self, session: str, block_hashes: list[int], ttl_s: float, now: float | None = None, tenant: str | None = None
    ) -> int:
        return self.index.pin(session, block_hashes, ttl_s, self._clock(), tenant)

    def unpin(self, session: str, tenant: str | None = None) -> None:
        self.index.unpin(session, tenant)

    def is_pinned_session(self, session: str, tenant: str | None = None) -> bool:
        return self.index.is_pinned_session(session, tenant)

    @property
    def num_pinned_blocks(self) -> int:
        return self.index.num_pinned_blocks

    def tick(self) -> None:
        self.index.expire_pins(self._clock())

    def drain_events(self) -> list[KVEvent]:
        return self.index.drain_events()

    def tier_hashes(self) -> dict[Tier, list[int]]:
        return self.index.tier_hashes()

    def export(self, block_hashes: list[int]) -> list[int]:
        return []  # peers do not read simulated CPU tiers (peer pulls are off in the simulator)

    def release_export(self, slots: list[int]) -> None:
        pass

    def gauges(self) -> TierGauges:
        return TierGauges(
            cpu_blocks=len(self.index.cpu),
            cpu_capacity_blocks=self.cpu_blocks,
            pinned_blocks=self.index.num_pinned_blocks,
            pinned_sessions=self.index.num_pinned_sessions,
            disk_blocks=len(self.index.disk) if self.index.disk is not None else None,
        )

    def flush(self) -> None:
        pass
