"""A worker's settings (`WorkerConfig`, sent to its Ray actor as msgpack), where its disk tier lives, and its tiers
built from them (the engine, tiers and torch load inside `build_tiers`, never at import: the router process
imports this module)."""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from disagg.cluster.journal import JournalConfig
from disagg.config import EngineConfig, FaultConfig
from disagg.kv.tier_config import TierConfig
from disagg.model_store import cache_root
from disagg.protocol import Role
from disagg.tracing import TracingConfig
from disagg.transfer.config import TransportConfig
from disagg.wire import WireMessage

if TYPE_CHECKING:
    from disagg.engine.engine import LLMEngine
    from disagg.kv.store import TieredStore

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MockConfig:
    """A mock engine instead of the model (cluster/mocker.py): the simulator's runner behind a real worker."""

    time_model: str = ""  # a StepTimeModel JSON (bench/results/time_model.json); "" = the model's defaults
    time_scale: float = 0.0  # a step sleeps its modelled time x this (0: no time at all)
    num_blocks: int = 4096  # the mock's KV blocks (bookkeeping only: no memory behind them)


@dataclasses.dataclass
class WorkerConfig(WireMessage):
    """A worker's settings; a Ray actor gets them as this message's bytes (cluster/actors.py), never pickled."""

    TYPE: ClassVar[str] = "worker_config"
    name: str
    role: Role = Role.BOTH
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)  # kv_load_timeout_s: transfer_timeout_s
    # its disk tier: `worker_tiers` (disk_root: a directory with one disk tier per worker); None: no tiers
    tiers: TierConfig | None = dataclasses.field(default_factory=TierConfig)
    image_cache_bytes: int = 256 * 2**20  # a VLM worker's image embeddings kept by content hash (disagg/vision/)
    transfer_timeout_s: float = 10.0  # a KV read not done by then is recomputed (the engine's kv_load_timeout_s)
    idle_sleep_s: float = 0.002  # between ticks that delivered nothing while the engine has requests
    idle_max_sleep_s: float = 0.05  # ... and at most this long with none (a new request ends the wait at once)
    event_feed_batches: int = 4096  # KV event batches kept for routers that pull them (a slower one snapshots)
    mock: MockConfig | None = None  # the mocker (cluster/mocker.py) instead of the model; None: the model
    # "package.module:attribute" of a callable wrapping the worker's transport, resolved in the worker's process
    # (the chaos benchmark names a fault injector from tests/fake_transport.py); "": none
    transport_wrapper: str = ""
    tracing: TracingConfig | None = None  # None: no spans
    metrics_interval_s: float = 0.1  # how often the engine thread refreshes the figures heartbeats carry
    transport: TransportConfig = dataclasses.field(default_factory=TransportConfig)  # NIXL's UCX settings
    # after a failed step the loop waits failure_backoff_s per failure in a row, up to max_backoff_failures of them
    # (a worker that keeps failing is reported through heartbeats and restarted by the supervisor meanwhile)
    failure_backoff_s: float = 0.05
    max_backoff_failures: int = 20
    step_failure_budget: int = 40  # failed steps in a row tolerated; then the worker gives up (cluster/step_budget.py)
    journal: JournalConfig = dataclasses.field(default_factory=JournalConfig)  # streams outliving their relay
    # chaos drills: the worker takes `set_faults` orders (a FaultOrder) at run time; off, they are refused, and
    # nothing but a drill (`disagg bench chaos`, tests) turns it on: `disagg serve` has no option for it
    allow_fault_injection: bool = False

    def __post_init__(self) -> None:
        self.role = Role(self.role)


@dataclasses.dataclass
class FaultOrder(WireMessage):
    """A drill's order to a running worker (`EngineWorker.set_faults`): inject these faults from now on; None
    stops injecting (a weight corruption already applied stays until the process restarts)."""

    TYPE: ClassVar[str] = "fault_order"
    faults: FaultConfig | None = None


def worker_tiers(tiers: TierConfig | None, slot: str) -> TierConfig | None:
    """A worker's tiers: its disk tier is `<disk_root>/<slot>` unless `disk_dir` is set (a stable name per
    position, so the next run of the same layout serves the previous run's prefixes from disk).  The default root
    is $DISAGG_KV_ROOT, else ~/.cache/disagg/kv; a root of "" means no disk tier."""
    if tiers is None or tiers.disk_dir:
        return tiers
    root = tiers.disk_root
    if root is None:
        root = os.environ.get("DISAGG_KV_ROOT") or str(cache_root() / "kv")
    return dataclasses.replace(tiers, disk_dir=str(Path(root) / slot) if root else "")


def kv_fingerprint(engine: LLMEngine) -> str:
    """What must match for this engine to use KV that another engine wrote (disagg/kv/fingerprint.py): the
    tiers' directory name and the layout a worker publishes to its peers."""
    from disagg.kv.fingerprint import engine_fingerprint

    kv = engine.kv_tensor
    model_dir = Path(engine.config.model) if engine.config.model else None
    return engine_fingerprint(
        model_dir,
        str(engine.dtype),
        engine.config.block_size,
        tuple(kv.shape[1:]) if kv is not None else (),
        quantization=engine.config.quantization,
        kv_format=engine.kv_format,
        activations=engine.config.quant_activations,
    )


def build_tiers(engine: LLMEngine, config: WorkerConfig, fingerprint: str) -> TieredStore | None:
    """The worker's CPU (and disk) tier, its disk blocks under `fingerprint` (`kv_fingerprint`); config.tiers
    None or cpu_bytes 0 turns tiers off."""
    from disagg.kv.disk_tier import DiskTierBusy
    from disagg.kv.store import TieredStore

    tiers = worker_tiers(config.tiers, config.name)
    if tiers is None or tiers.cpu_bytes == 0:
        return None
    kv = engine.kv_tensor
    if kv is None:
        raise ValueError("KV tiers need an engine with a KV cache tensor")
    try:
        return TieredStore(tiers, engine.pool, kv, fingerprint)
    except DiskTierBusy:  # another live worker owns the directory: use one of our own
        tiers = dataclasses.replace(tiers, disk_dir=f"{tiers.disk_dir}-{uuid.uuid4().hex[:6]}")
        log.warning("disk tier directory busy; using %s", tiers.disk_dir)
        return TieredStore(tiers, engine.pool, kv, fingerprint)
