"""Typed telemetry on the wire: a worker's figures (`WorkerStats`, inside its `Heartbeat`) and the router core's
own counts (`RouterCounters`), each field tagged with how /metrics exports it (disagg/telemetry.py)."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from disagg.engine.step_time import ChunkRule, StepCoefficients
from disagg.protocol import CorruptReason, FallbackKind, PricedFrom, Role, ServePath, SourceKind, Tier
from disagg.wire import WireMessage


class StatKind(str, enum.Enum):
    """How /metrics exports a `WorkerStats` field (disagg/telemetry.py)."""

    COUNTER = "counter"  # cumulative since the worker started
    GAUGE = "gauge"  # a current level


def _stat(kind: StatKind, default: Any = 0) -> Any:
    if default is dict:
        return field(default_factory=dict, metadata={"kind": kind})
    return field(default=default, metadata={"kind": kind})


def stat_kind(f: dataclasses.Field) -> StatKind:
    return f.metadata["kind"]


_C, _G = StatKind.COUNTER, StatKind.GAUGE


@dataclass
class WorkerStats(WireMessage):
    """A worker's figures (built by cluster/worker.py, by the simulator for its router; read by the router's
    load checks, the planner, and /metrics as `disagg:worker_<field>{worker, detail}`: a map's key is `detail`).

    The `tier_*` fields are None (maps empty) on a worker without CPU/disk tiers; with tiers, every tier and
    reason is reported, zeros included (dashboards need the series).  `loaded_blocks` lists the sources used.
    """

    TYPE: ClassVar[str] = "worker_stats"
    steps: int = _stat(_C)
    generated_tokens: int = _stat(_C)
    preemptions: int = _stat(_C)
    prefix_query_tokens: int = _stat(_C)
    prefix_hit_tokens: int = _stat(_C)
    loaded_tokens: int = _stat(_C)
    failed_loads: int = _stat(_C)
    leases_expired: int = _stat(_C)
    transfer_bytes: int = _stat(_C)
    transfer_reads: int = _stat(_C)
    transfer_failures: int = _stat(_C)
    transfer_seconds: float = _stat(_C, 0.0)
    local_only_imports: int = _stat(_C)  # prefill results taken with nothing to read (only a notification)
    step_failures: int = _stat(_C)
    events_published: int = _stat(_C)
    spec_proposed_tokens: int = _stat(_C)  # speculative decoding: tokens proposed, accepted, verifications abandoned
    spec_accepted_tokens: int = _stat(_C)
    spec_fallbacks: int = _stat(_C)
    images_received: int = _stat(_C)  # a VLM's request images whose rows came with the request (an encoder's)
    images_encoded: int = _stat(_C)  # ... that this worker encoded itself (colocated, a fallback, a recompute)
    images_encoded_as_encoder: int = _stat(_C)  # images the router sent it to encode (--encode-on-prefill)
    loaded_blocks: dict[SourceKind, int] = _stat(_C, dict)
    tier_query_blocks: int | None = _stat(_C, None)
    tier_hit_blocks: dict[Tier, int] = _stat(_C, dict)
    tier_loaded_blocks: dict[Tier, int] = _stat(_C, dict)
    tier_stored_blocks: dict[Tier, int] = _stat(_C, dict)
    tier_bytes_stored: dict[Tier, int] = _stat(_C, dict)
    tier_bytes_loaded: dict[Tier, int] = _stat(_C, dict)
    tier_evictions: dict[Tier, int] = _stat(_C, dict)
    tier_load_seconds: dict[Tier, float] = _stat(_C, dict)
    tier_loads: dict[Tier, int] = _stat(_C, dict)
    tier_corrupt: dict[CorruptReason, int] = _stat(_C, dict)
    tier_write_failures: int | None = _stat(_C, None)
    tier_store_skipped: int | None = _stat(_C, None)
    kv_blocks_total: int = _stat(_G)
    kv_blocks_free: int = _stat(_G)
    kv_blocks_cached: int = _stat(_G)
    running: int = _stat(_G)
    waiting: int = _stat(_G)
    loading: int = _stat(_G)
    leases: int = _stat(_G)
    adopted_blocks: int = _stat(_G)
    prefill_s_per_token: float | None = _stat(_G, None)  # None until the engine measured a prefill
    step_s_per_token: float | None = _stat(_G, None)  # every model step's time per token (EWMA; gray failures)
    # the engine's fitted step-time model (engine/step_time.py; None while cold) and its prompt-chunk rule: the
    # router prices a prefill on this worker with them (router/placement.py)
    step_base_s: float | None = _stat(_G, None)
    step_s_per_new_token: float | None = _stat(_G, None)
    step_s_per_seq: float | None = _stat(_G, None)
    step_s_per_kpair: float | None = _stat(_G, None)
    chunk_target_s: float = _stat(_G, 0.0)  # 0: fixed chunks of chunk_max_tokens
    chunk_max_tokens: int = _stat(_G)
    chunk_min_tokens: int = _stat(_G)
    transfer_s_per_block: float | None = _stat(_G, None)  # KV read from a peer, measured per block (None: no read)
    tier_cpu_blocks: int | None = _stat(_G, None)
    tier_cpu_capacity_blocks: int | None = _stat(_G, None)
    tier_pinned_blocks: int | None = _stat(_G, None)
    tier_pinned_sessions: int | None = _stat(_G, None)
    tier_stores_in_flight: int | None = _stat(_G, None)
    tier_demotions_in_flight: int | None = _stat(_G, None)
    tier_disk_blocks: int | None = _stat(_G, None)  # the disk figures: None without a disk tier
    tier_disk_bytes: int | None = _stat(_G, None)
    tier_disk_capacity_bytes: int | None = _stat(_G, None)
    tier_load_s_per_block: dict[Tier, float] = _stat(_G, dict)  # measured tiers only

    def set_timing(self, model: StepCoefficients | None, rule: ChunkRule) -> None:
        """The engine's step-time model (None: cold) and its chunk rule, as the router reads them back."""
        if model is not None:
            self.step_base_s, self.step_s_per_new_token = model.base, model.per_token
            self.step_s_per_seq, self.step_s_per_kpair = model.per_seq, model.per_attn
        self.chunk_target_s, self.chunk_max_tokens, self.chunk_min_tokens = (
            rule.target_s,
            rule.max_tokens,
            rule.min_chunk,
        )

    def step_model(self) -> StepCoefficients | None:
        base, per_token = self.step_base_s, self.step_s_per_new_token
        per_seq, per_attn = self.step_s_per_seq, self.step_s_per_kpair
        if base is None or per_token is None or per_seq is None or per_attn is None:
            return None
        return StepCoefficients(base, per_token, per_seq, per_attn)

    def chunk_rule(self, block_size: int) -> ChunkRule | None:
        """None: a worker that does not report its rule (an older one, a stand-in)."""
        if self.chunk_max_tokens <= 0:
            return None
        return ChunkRule(self.chunk_target_s, self.chunk_max_tokens, max(1, self.chunk_min_tokens), block_size)


# the bounds of the TTFT predictions' relative-error histogram (disagg:ttft_prediction_relative_error): the share
# within 0.2 reads the goal (median error <= 20% exactly when at least half are within it)
PREDICTION_ERROR_BOUNDS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class RouterCounters(WireMessage):
    """The router core's own counts (/metrics: disagg:migrations, disagg:requests_by_path{path},
    disagg:fallbacks{kind}, disagg:role_changes{from,to}); the router actor's `health()` sends them too."""

    TYPE: ClassVar[str] = "router_counters"
    migrations: int = 0
    paths: dict[ServePath, int] = field(default_factory=dict)  # requests served, by how their prefill ran
    fallbacks: dict[FallbackKind, int] = field(default_factory=dict)
    role_changes: dict[Role, dict[Role, int]] = field(default_factory=dict)  # from -> to -> count
    placements: dict[PricedFrom, int] = field(default_factory=dict)  # routing decisions, by what priced them
    ttft_predictions: int = 0  # finished first attempts whose decision predicted their time to first token
    ttft_prediction_error: float = 0.0  # the sum of their |predicted - actual| / actual (from routing)
    # of them, those with the error within each of PREDICTION_ERROR_BOUNDS (cumulative, as a histogram's buckets)
    ttft_prediction_error_within: list[int] = field(default_factory=lambda: [0] * len(PREDICTION_ERROR_BOUNDS))

    def placed(self, priced_from: PricedFrom) -> None:
        self.placements[priced_from] = self.placements.get(priced_from, 0) + 1

    def predicted(self, relative_error: float) -> None:
        self.ttft_predictions += 1
        self.ttft_prediction_error += relative_error
        for i, bound in enumerate(PREDICTION_ERROR_BOUNDS):
            if relative_error <= bound:
                self.ttft_prediction_error_within[i] += 1

    def served(self, path: ServePath) -> None:
        self.paths[path] = self.paths.get(path, 0) + 1

    def fell_back(self, kind: FallbackKind) -> None:
        self.fallbacks[kind] = self.fallbacks.get(kind, 0) + 1

    def role_changed(self, old: Role, new: Role) -> None:
        to = self.role_changes.setdefault(old, {})
        to[new] = to.get(new, 0) + 1


@dataclass
class Heartbeat(WireMessage):
    """A worker's answer to the router's liveness probe: who it is (a restart changes `incarnation`), whether its
    step loop progresses, and the load/latency figures the router and /metrics use (`stats`; None until the
    worker's engine thread first measured them)."""

    TYPE: ClassVar[str] = "heartbeat"
    worker: str
    incarnation: str
    role: Role
    pid: int
    node_id: str
    steps: int  # engine steps completed so far
    has_work: bool
    step_busy_s: float  # how long the current step has been running (0: none running)
    consecutive_step_failures: int
    agent_name: str  # the NIXL agent of this incarnation
    stats: WorkerStats | None = None
    healthy: bool = True  # False: the worker gave up (its step failure budget is spent) and waits to be restarted
    fault: str = ""  # why it is unhealthy when its steps did not fail: impossible output (NaN logits, bad token id)
    asleep: bool = False  # its KV memory given back (engine/sleep.py): parked by the fleet, or its model sleeps

    def __post_init__(self) -> None:
        self.role = Role(self.role)
