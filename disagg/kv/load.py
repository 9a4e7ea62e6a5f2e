"""What moves KV into a sequence's device blocks: a load (`KVLoad`), its states (`LoadState`, SGLang's KVPoll
reduced to what a scheduler acts on), and the places loads come from (`KVSource`: a peer over the transport, or
this worker's tiers).  `KVTiers` is the tiers as the connector and the engine see them: a source, a sink for
write-through stores, the pins of sessions and the tier events - implemented by the TieredStore (kv/store.py)
and by the simulator's tiers.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TypeVar

from disagg.protocol import KVEvent, PrefillResult, SourceKind, Tier


class LoadState(enum.Enum):
    """What the scheduler sees when it polls a load (SGLang's KVPoll, reduced to what a scheduler acts on)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class LoadHandle:
    """A source's own state of one load, set by its `start`: each source subclasses it with what it keeps (a
    transfer in flight, copy jobs and disk reads, a virtual finish time), and reads it back with `handle_of`."""


_H = TypeVar("_H", bound=LoadHandle)


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
    remote: PrefillResult | None = None  # peer loads: the owner's offer (which blocks, in which regions)
    handle: LoadHandle | None = None  # the source's own state (None until it starts the load)
    accounted: bool = False  # counted in ConnectorStats
    parent_hash: int | None = None  # hash of the block before the first loaded one (prefetch: for its event)


def handle_of(load: KVLoad, kind: type[_H]) -> _H:
    """`load`'s state as the source that started it keeps it; a load of another source here is a bug."""
    handle = handle_if_started(load, kind)
    if handle is None:
        raise TypeError(f"{load.request_id}: load not started by a {kind.__name__} source")
    return handle


def handle_if_started(load: KVLoad, kind: type[_H]) -> _H | None:
    """As `handle_of`, but None for a load its source has not started yet (abandoned before its start)."""
    if load.handle is not None and not isinstance(load.handle, kind):
        raise TypeError(f"{load.request_id}: load handle {type(load.handle).__name__} is not a {kind.__name__}")
    return load.handle


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


class _Notifier(KVSource):
    """A source that can tell a peer 'nothing to read' (PeerSource)."""

    @abstractmethod
    def notify_done(self, result: PrefillResult, request_id: str) -> None: ...


class KVTiers(KVSource):
    """The CPU (and disk) tiers behind one worker: loads out of them, write-through stores into them, session
    pins, and the events of what they hold."""

    kind = SourceKind.TIERS
    load_s_per_block: dict[Tier, float]  # measured (or modelled) load time per block, per tier

    @abstractmethod
    def lookup(self, block_hashes: list[int], count: bool = True) -> list[Tier]:
        """The tier of each leading block held (CPU before disk), up to the first one neither holds."""

    @abstractmethod
    def store(self, block_ids: list[int], block_hashes: list[int]) -> None:
        """Offer newly computed full device blocks (write-through)."""

    @abstractmethod
    def pin(
        self, session: str, block_hashes: list[int], ttl_s: float, now: float | None = None, tenant: str | None = None
    ) -> int:
        """Keep a tenant's session's blocks in CPU for `ttl_s` (replacing its previous pin); returns the number
        pinned."""

    @abstractmethod
    def is_pinned_session(self, session: str, tenant: str | None = None) -> bool: ...

    @abstractmethod
    def export(self, block_hashes: list[int]) -> list[int]:
        """Reference the CPU slots of the leading `block_hashes` held in CPU, for a peer's read."""

    @abstractmethod
    def release_export(self, slots: list[int]) -> None: ...

    @abstractmethod
    def tier_hashes(self) -> dict[Tier, list[int]]: ...

    @abstractmethod
    def drain_events(self) -> list[KVEvent]: ...
