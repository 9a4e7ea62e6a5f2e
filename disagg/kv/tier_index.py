"""The tier index: which blocks one worker's CPU and disk tiers hold, in LRU order, which sessions pin them, and
the events that tell the router - bookkeeping only (no threads, no I/O, no torch), like vLLM v1's
OffloadingManager beside its transfer handlers.

Two users drive it: the TieredStore (kv/store.py), which moves the bytes (copies, disk threads) and changes the
index when a move completes, and the simulator's tiers, which move nothing and change it at once.  The rules they
share live here:

  * lookup   the tier of each leading block held, CPU before disk, up to the first block neither holds
  * LRU      a CPU or disk block touched by a load or a store moves to the most recently used end; victims are
             taken from the other end
  * pins     a session's blocks are pinned for a TTL; pinned blocks are never CPU victims; pins fit a budget
             (the oldest-expiring sessions are unpinned first) and expire on time (the caller's clock); sessions
             are namespaced by tenant, and a named tenant's pins fit its own share of the budget first
  * events   every change to what a tier holds is a KVEvent tagged with the tier (`drain_events`)

Where the two differ in how blocks reach disk, each has its own rule here (`commit_disk`: the store, one block
whose write completed, room made first; `demote_to_disk`: the simulator, a batch moved at once, trimmed after),
so each keeps its behaviour exactly.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator

from disagg.isolation import SessionKey
from disagg.kv.tier_config import TierStats, leading_tiers
from disagg.protocol import EventKind, KVEvent, Tier


class LruBlocks:
    """Block hashes in least-recently-used-first order, each with a value (the CPU tier: its slot)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity  # blocks; None: unbounded (the owner keeps the size)
        self._order: OrderedDict[int, int] = OrderedDict()

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._order

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def get(self, block_hash: int) -> int | None:
        return self._order.get(block_hash)

    def hashes(self) -> list[int]:
        return list(self._order)

    def add(self, block_hash: int, value: int = 0) -> None:
        self._order[block_hash] = value
        self._order.move_to_end(block_hash)

    def touch(self, block_hash: int) -> None:
        if block_hash in self._order:
            self._order.move_to_end(block_hash)

    def pop(self, block_hash: int) -> int | None:
        return self._order.pop(block_hash, None)

    def pop_oldest(self) -> int:
        return self._order.popitem(last=False)[0]

    def over(self, incoming: int = 0) -> bool:
        """Would `incoming` more blocks exceed the capacity?"""
        return self.capacity is not None and len(self._order) + incoming > self.capacity

    def clear(self) -> None:
        self._order.clear()


class TierIndex:
    def __init__(self, cpu: LruBlocks, disk: LruBlocks | None, pin_budget: int, tenant_pin_share: float = 1.0) -> None:
        self.cpu = cpu
        self.disk = disk
        self.pin_budget = pin_budget
        self.tenant_pin_share = tenant_pin_share  # the fraction of pin_budget one named tenant's sessions may hold
        self.stats = TierStats()
        self._events: list[KVEvent] = []
        self._pins: dict[SessionKey, tuple[float, list[int]]] = {}  # (tenant, session) -> (expiry, hashes)
        self._pinned: Counter = Counter()  # hash -> sessions pinning it

    # ------------------------------------------------------------------ lookups
    def lookup(self, block_hashes: list[int], count: bool = True) -> list[Tier]:
        """The tier of each of the leading `block_hashes` held in CPU or on disk (CPU preferred)."""
        tiers = leading_tiers(block_hashes, self.cpu, self.disk)
        if count and block_hashes:
            self.stats.count_lookup(len(block_hashes), tiers)
        return tiers

    def tier_hashes(self) -> dict[Tier, list[int]]:
        out = {Tier.CPU: self.cpu.hashes()}
        if self.disk is not None:
            out[Tier.DISK] = self.disk.hashes()
        return out

    def touch(self, tier: Tier, block_hash: int) -> None:
        """A load or store used the block: it becomes the most recently used of its tier."""
        (self.cpu if tier is Tier.CPU else self._disk).touch(block_hash)

    # ------------------------------------------------------------------ CPU
    def cpu_victims(self, n: int, keep: Callable[[int], bool] | None = None) -> list[int]:
        """Up to n least recently used CPU hashes that may leave: not pinned and not kept by the caller."""
        out: list[int] = []
        for h in self.cpu:
            if len(out) >= n:
                break
            if h not in self._pinned and (keep is None or not keep(h)):
                out.append(h)
        return out

    def drop_cpu(self, block_hashes: list[int]) -> None:
        """Blocks left the CPU tier (evicted or demoted): one REMOVED event for them."""
        for h in block_hashes:
            self.cpu.pop(h)
        self.stats.evictions[Tier.CPU] += len(block_hashes)
        self._events.append(KVEvent(EventKind.REMOVED, block_hashes, tier=Tier.CPU))

    def stored(self, tier: Tier, block_hashes: list[int]) -> None:
        """Blocks became visible in a tier (already in its index): count and announce them."""
        self.stats.stored_blocks[tier] += len(block_hashes)
        self._events.append(KVEvent(EventKind.STORED, block_hashes, tier=tier))

    # ------------------------------------------------------------------ disk
    def restore_disk(self, block_hashes: list[int]) -> list[int]:
        """Index blocks found on disk at start-up (least recently used first); returns those past the capacity
        (the oldest), which the caller deletes.  The rest are announced."""
        disk = self._disk
        for h in block_hashes:
            disk.add(h)
        evicted = []
        while disk.over():  # a smaller capacity than last time: drop the oldest
            evicted.append(disk.pop_oldest())
        if len(disk):
            self._events.append(KVEvent(EventKind.STORED, disk.hashes(), tier=Tier.DISK))
        return evicted

    def on_disk(self, block_hash: int) -> bool:
        return self.disk is not None and block_hash in self.disk

    def commit_disk(self, block_hash: int) -> tuple[list[int], bool]:
        """The store's rule: a block's disk write completed.  Least recently used disk blocks make room first
        (returned: the caller deletes their files), then the block joins the index unless already there
        (returned: whether it joined)."""
        disk = self._disk
        evicted = []
        while len(disk) and disk.over(1):
            evicted.append(disk.pop_oldest())
        if evicted:
            self.stats.evictions[Tier.DISK] += len(evicted)
            self._events.append(KVEvent(EventKind.REMOVED, evicted, tier=Tier.DISK))
        if block_hash in disk:
            return evicted, False
        disk.add(block_hash)
        self.stored(Tier.DISK, [block_hash])
        return evicted, True

    def demote_to_disk(self, block_hashes: list[int]) -> None:
        """The simulator's rule: blocks leaving CPU reach disk at once (refreshed if there already); the least
        recently used disk blocks past the capacity are dropped after."""
        disk = self._disk
        fresh = [h for h in block_hashes if h not in disk]
        for h in block_hashes:
            disk.add(h)
        dropped = []
        while disk.over():
            dropped.append(disk.pop_oldest())
        if fresh:
            self._events.append(KVEvent(EventKind.STORED, fresh, tier=Tier.DISK))
        if dropped:
            self._events.append(KVEvent(EventKind.REMOVED, dropped, tier=Tier.DISK))

    def forget_disk(self, block_hash: int) -> bool:
        """A disk block turned out unusable (corrupt): out of the index, and the router told."""
        if self.disk is None or block_hash not in self.disk:
            return False
        self.disk.pop(block_hash)
        self._events.append(KVEvent(EventKind.REMOVED, [block_hash], tier=Tier.DISK))
        return True

    @property
    def _disk(self) -> LruBlocks:
        """The disk index, on paths only reached when there is a disk tier."""
        assert self.disk is not None, "disk tier used while off"
        return self.disk

    # ------------------------------------------------------------------ pins
    def pin(self, session: str, block_hashes: list[int], ttl_s: float, now: float, tenant: str | None = None) -> int:
        """Pin a tenant's session's blocks until now + ttl_s (replacing that session's previous pin, never another
        tenant's session of the same id); returns how many are pinned.  A named tenant first makes room among its
        own pins (its share of the budget), so its long ttl_s cannot push out the others' pins."""
        key = SessionKey(tenant, session)
        self._drop_pin(key)
        budget = self.pin_budget if tenant is None else self.tenant_pin_budget
        hashes = list(dict.fromkeys(block_hashes))[:budget]
        if tenant is not None:
            self._make_room(hashes, budget, tenant)
        self._make_room(hashes, self.pin_budget, None)
        if not hashes:
            return 0
        self._pins[key] = (now + ttl_s, hashes)
        self._pinned.update(hashes)
        return len(hashes)

    @property
    def tenant_pin_budget(self) -> int:
        return int(self.pin_budget * self.tenant_pin_share)

    def _make_room(self, hashes: list[int], budget: int, tenant: str | None) -> None:
        """Unpin sessions until `hashes` fit `budget`: a named tenant's own oldest-expiring ones (tenant given), else
        the oldest-expiring ones of the tenant holding the most pinned blocks (with one tenant: the oldest)."""
        while True:
            keys = [k for k in self._pins if tenant is None or k.tenant == tenant]
            held = set(self._pinned) if tenant is None else {h for k in keys for h in self._pins[k][1]}
            if not keys or len(held) + sum(1 for h in hashes if h not in held) <= budget:
                return
            size: Counter = Counter()
            for k in keys:
                size[k.tenant] += len(self._pins[k][1])
            self._drop_pin(min(keys, key=lambda k: (-size[k.tenant], self._pins[k][0])))

    def unpin(self, session: str, tenant: str | None = None) -> None:
        self._drop_pin(SessionKey(tenant, session))

    def _drop_pin(self, key: SessionKey) -> None:
        entry = self._pins.pop(key, None)
        if entry is not None:
            self._pinned.subtract(entry[1])
            self._pinned = +self._pinned  # drop zero counts

    def expire_pins(self, now: float) -> int:
        expired = [s for s, (deadline, _) in self._pins.items() if deadline <= now]
        for s in expired:
            self._drop_pin(s)
        return len(expired)

    def is_pinned(self, block_hash: int) -> bool:
        return block_hash in self._pinned

    def is_pinned_session(self, session: str, tenant: str | None = None) -> bool:
        return SessionKey(tenant, session) in self._pins

    @property
    def num_pinned_blocks(self) -> int:
        return len(self._pinned)

    @property
    def num_pinned_sessions(self) -> int:
        return len(self._pins)

    # ------------------------------------------------------------------ events
    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events
