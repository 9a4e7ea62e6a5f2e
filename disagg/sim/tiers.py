"""CPU and disk tiers for simulated workers, in virtual time: the TieredStore's policy (write-through to CPU,
LRU demotion to disk, pins per session with a TTL and a budget) over sets of block hashes, with load times from
the time model (calibrated against the real TieredStore by `disagg bench calibrate`).  The engine's KV connector
drives it exactly as it drives the real store: lookup, start, poll, store, pin, events."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from disagg.kv.connector import KVLoad, KVSource, LoadState, SourceKind
from disagg.kv.tier_config import TierStats, leading_tiers
from disagg.protocol import EventKind, KVEvent, Tier


class SimTiers(KVSource):
    kind = SourceKind.TIERS

    def __init__(
        self,
        cpu_blocks: int,
        disk_blocks: int,
        cpu_s: float,
        disk_s: float,
        clock: Callable[[], float],
        at: Callable[[float, Callable[[], None]], None],
        wake: Callable[[], None],
        pin_budget_fraction: float = 0.5,
    ) -> None:
        self.cpu: OrderedDict[int, None] = OrderedDict()
        self.disk: OrderedDict[int, None] = OrderedDict()
        self.cpu_blocks, self.disk_blocks = cpu_blocks, disk_blocks
        self.load_s_per_block = {Tier.CPU: cpu_s, Tier.DISK: disk_s}
        self._clock, self._at, self._wake = clock, at, wake
        self.pin_budget = int(cpu_blocks * pin_budget_fraction)
        self.stats = TierStats()
        self._events: list[KVEvent] = []
        self._pins: dict[str, tuple[float, list[int]]] = {}
        self._pinned: Counter = Counter()

    # ------------------------------------------------------------------ lookups and loads
    def lookup(self, block_hashes: list[int], count: bool = True) -> list[Tier]:
        tiers = leading_tiers(block_hashes, self.cpu, self.disk)
        if count and block_hashes:
            self.stats.count_lookup(len(block_hashes), tiers)
        return tiers

    def start(self, load: KVLoad) -> None:
        seconds = sum(self.load_s_per_block[t] for t in load.tiers)
        load.handle = self._clock() + seconds
        for h in load.block_hashes:
            if h in self.cpu:
                self.cpu.move_to_end(h)
        self._at(load.handle, self._wake)

    def poll(self, load: KVLoad) -> LoadState:
        if self._clock() < load.handle:
            return LoadState.PENDING
        load.num_ok_blocks = len(load.block_hashes)
        for t in load.tiers:
            self.stats.loaded_blocks[t] += 1
        return LoadState.DONE

    def abandon(self, load: KVLoad) -> bool:
        return True

    # ------------------------------------------------------------------ stores, demotion, pins
    def store(self, block_ids: list[int], block_hashes: list[int]) -> None:
        stored = []
        for h in block_hashes:
            if h in self.cpu:
                self.cpu.move_to_end(h)
                continue
            self.cpu[h] = None
            stored.append(h)
        if stored:
            self.stats.stored_blocks[Tier.CPU] += len(stored)
            self._events.append(KVEvent(EventKind.STORED, stored, tier=Tier.CPU))
        self._evict_cpu()

    def _evict_cpu(self) -> None:
        demoted = []
        while len(self.cpu) > self.cpu_blocks:
            victim = next((h for h in self.cpu if h not in self._pinned), None)
            if victim is None:
                break
            del self.cpu[victim]
            demoted.append(victim)
        if not demoted:
            return
        self.stats.evictions[Tier.CPU] += len(demoted)
        self._events.append(KVEvent(EventKind.REMOVED, demoted, tier=Tier.CPU))
        if not self.disk_blocks:
            return
        fresh = [h for h in demoted if h not in self.disk]
        for h in demoted:
            self.disk[h] = None
            self.disk.move_to_end(h)
        dropped = []
        while len(self.disk) > self.disk_blocks:
            dropped.append(self.disk.popitem(last=False)[0])
        if fresh:
            self._events.append(KVEvent(EventKind.STORED, fresh, tier=Tier.DISK))
        if dropped:
            self._events.append(KVEvent(EventKind.REMOVED, dropped, tier=Tier.DISK))

    def pin(self, session: str, block_hashes: list[int], ttl_s: float, now: float | None = None) -> int:
        self.unpin(session)
        hashes = list(dict.fromkeys(block_hashes))[: self.pin_budget]
        while self._pins and len(self._pinned) + sum(h not in self._pinned for h in hashes) > self.pin_budget:
            self.unpin(min(self._pins, key=lambda s: self._pins[s][0]))
        if hashes:
            self._pins[session] = (self._clock() + ttl_s, hashes)
            self._pinned.update(hashes)
        return len(hashes)

    def unpin(self, session: str) -> None:
        entry = self._pins.pop(session, None)
        if entry is not None:
            self._pinned.subtract(entry[1])
            self._pinned = +self._pinned

    def is_pinned_session(self, session: str) -> bool:
        return session in self._pins

    @property
    def num_pinned_blocks(self) -> int:
        return len(self._pinned)

    def tick(self) -> None:
        now = self._clock()
        for session in [s for s, (deadline, _) in self._pins.items() if deadline <= now]:
            self.unpin(session)

    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def tier_hashes(self) -> dict[Tier, list[int]]:
        return {Tier.CPU: list(self.cpu), Tier.DISK: list(self.disk)}

    def export(self, block_hashes: list[int]) -> list[int]:
        return []  # peers do not read simulated CPU tiers (peer pulls are off in the simulator)

    def release_export(self, slots: list[int]) -> None:
        pass

    def gauges(self) -> dict[str, Any]:
        return {"cpu_blocks": len(self.cpu), "disk_blocks": len(self.disk), "pinned_blocks": len(self._pinned)}

    def flush(self) -> None:
        pass
