"""The routing policy's settings (router/policy.py reads them; the CLI's routing flags are generated from them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from disagg.engine.step_time import StepCoefficients
from disagg.router.correction import CorrectionConfig
from disagg.router.placement import Placement


class PolicyKind(str, enum.Enum):
    KV = "kv"
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"


@dataclass
class PolicyConfig:
    kind: PolicyKind = field(default=PolicyKind.KV, metadata={"flag": "--policy", "help": "how workers are chosen"})
    # an uncached block weighs 6 blocks of decode load: measured on both Mooncake traces (bench/router.py), 1 (the
    # Dynamo default) left a quarter of the hits behind at almost the same load balance (docs/benchmarks.md)
    overlap_weight: float = 6.0
    queue_weight: float = 1.0
    affinity_bonus: float = 4.0  # blocks
    # a LoRA request's pull to the worker that last ran its adapter (most likely still loaded there), in blocks
    adapter_affinity_bonus: float = 8.0
    temperature: float = 0.0  # 0: argmin, random among exact ties
    min_remote_prefill_tokens: int = 64
    max_prefill_queue_tokens: int = 8192  # a prefill worker with more queued prompt tokens counts as saturated
    cpu_load_cost: float = 0.05  # prior cost of loading a block from CPU, as a fraction of recomputing it
    disk_load_cost: float = 0.3  # same for disk
    peer_pull: bool = True
    min_peer_pull_blocks: int = 4
    max_sessions: int = 100_000  # bound of the session -> worker table (least recently used dropped)
    seed: int | None = None
    placement: Placement = field(
        default=Placement.THRESHOLD,
        metadata={
            "flag": "--placement",
            "help": "where prefill runs: threshold (remote when >= min_remote_prefill_tokens uncached and a prefill "
            "worker has queue room) | cost (lowest predicted time to first token, from measured step times)",
        },
    )
    ttft_target_s: float = 0.0  # cost placement: the TTFT SLO it places for (0: the lowest predicted TTFT)
    tpot_target_s: float = 0.0  # cost placement: the TPOT SLO flexible workers keep (0: only when no room)
    flexible: bool = field(
        default=False,
        metadata={
            "flag": "--flexible-workers",
            "help": "with --placement cost: an idle prefill worker serves a request whole when no decode worker "
            "has room, or when the decode worker's next step would break the TPOT SLO",
        },
    )
    # cost placement's prior, for a worker with no measured step-time model yet: the default model's step times
    # on a 2-core CPU (bench/results/time_model.json) and a KV read per block (docs/benchmarks.md, NIXL reads)
    prior_step_base_s: float = 0.032
    prior_step_s_per_token: float = 0.00255
    prior_step_s_per_seq: float = 0.0033
    prior_step_s_per_kpair: float = 0.00071
    prior_transfer_s_per_block: float = 0.00014
    # cost placement: each worker's predictions scaled by how far its outcomes ran from them (router/correction.py)
    ttft_correction_window: int = field(
        default=CorrectionConfig.window,
        metadata={"help": "each worker's TTFT correction learns from its last N outcomes (0: no correction)"},
    )

    def __post_init__(self) -> None:
        try:
            self.kind = PolicyKind(self.kind)
        except ValueError:
            raise ValueError(f"unknown policy {self.kind!r}: kv, round_robin or least_loaded") from None
        try:
            self.placement = Placement(self.placement)
        except ValueError:
            raise ValueError(f"unknown placement {self.placement!r}: threshold or cost") from None
        if self.flexible and self.placement is not Placement.COST:
            raise ValueError("--flexible-workers needs --placement cost (it prices each worker's next step)")

    def prior(self) -> StepCoefficients:
        return StepCoefficients(
            self.prior_step_base_s, self.prior_step_s_per_token, self.prior_step_s_per_seq, self.prior_step_s_per_kpair
        )
