"""The cluster-spec grammar shared by the planner, the simulator and the bench harness: "name=PxD:policy[:key=value
...]" names one cluster configuration (P prefill and D decode workers, a routing policy, PolicyConfig overrides and
cluster settings), and a ClusterSpec turns into the settings of the runtime's own configs (policy, planner, KV
tiers) for a real cluster (`disagg bench compare`) or a simulated one (`disagg bench simulate`, `disagg plan`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from disagg.kv.tier_config import TierConfig
from disagg.planner.policy import PlannerConfig
from disagg.router.placement import Placement
from disagg.router.policy import PolicyConfig, PolicyKind
from disagg.workload.metrics import SLO

# config-spec settings that are not PolicyConfig fields
CLUSTER_KEYS = {
    "cpu_tier_mb": "CPU KV tier per worker in MiB (0: no tiers)",
    "disk_tier_mb": "disk KV tier per worker in MiB (0: none; real runs only)",
    "hints": "1: the replay sends session ids and KV retention pins",
    "planner": "1: the planner moves workers between prefill and decode at runtime (the run's SLO)",
    "adaptive": "1: cost-priced prefill placement and prompt chunks sized from the run's TPOT SLO",
}
# an adaptive run's step-time target, as a share of its TPOT SLO: the engine's step model predicts the model's own
# time, and the worker loop, sampling and streaming come on top of it
ADAPTIVE_TPOT_SHARE = 0.8


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    num_prefill: int
    num_decode: int
    policy: str
    policy_args: tuple[tuple[str, float], ...] = ()  # PolicyConfig overrides, e.g. min_remote_prefill_tokens
    cpu_tier_mb: int | None = None  # None: the product's default tiers
    disk_tier_mb: int | None = None  # None: the product's default disk tier
    hints: bool = False
    planner: bool = False
    adaptive: bool = False

    def chunk_target_ms(self, slo: SLO) -> float:
        """The engines' --prefill-chunk-target-ms for this run (0: fixed chunks)."""
        return slo.tpot_ms * ADAPTIVE_TPOT_SHARE if self.adaptive else 0.0

    def planner_config(self, slo: SLO) -> PlannerConfig | None:
        """The planner for this run (judged against the run's SLO), or None for a static split."""
        if not self.planner:
            return None
        return PlannerConfig(enabled=True, ttft_slo_s=slo.ttft_ms / 1000, tpot_slo_s=slo.tpot_ms / 1000)

    @property
    def workers(self) -> int:
        return self.num_prefill + self.num_decode

    def policy_settings(self) -> dict[str, str | float]:
        """The PolicyConfig fields this spec sets (seeded: runs repeat), as reports show them."""
        return {"kind": self.policy, "seed": 0, **dict(self.policy_args)}

    def policy_config(self, slo: SLO | None = None) -> PolicyConfig:
        """The run's routing policy; an adaptive run places prefills for `slo`'s TTFT."""
        config = PolicyConfig(kind=PolicyKind(self.policy), seed=0)
        if self.adaptive:
            config.placement = Placement.COST
            config.ttft_target_s = slo.ttft_ms / 1000 if slo is not None else 0.0
            config.tpot_target_s = slo.tpot_ms / 1000 if slo is not None else 0.0
        for name, value in self.policy_args:  # parsed as numbers: each takes its field's type (int, float, bool)
            setattr(config, name, type(getattr(config, name))(value))
        return config

    def tiers(self, disk_root: str) -> TierConfig | None:
        """Worker tier settings: a fresh disk directory per run, so no run inherits another's prefix cache."""
        if self.cpu_tier_mb == 0:
            return None
        cpu = self.cpu_tier_mb << 20 if self.cpu_tier_mb is not None else TierConfig.cpu_bytes
        disk = self.disk_tier_mb << 20 if self.disk_tier_mb else TierConfig.disk_bytes
        root = "" if self.disk_tier_mb == 0 else disk_root  # "": no disk tier
        return TierConfig(cpu_bytes=cpu, disk_bytes=disk, disk_root=root)


def parse_configs(text: str) -> list[ClusterSpec]:
    """'name=PxD:policy[:key=value...],...' -> specs; P=0 means aggregated workers; key=value items override
    PolicyConfig fields (e.g. disagg16=1x1:kv:min_remote_prefill_tokens=16) or set CLUSTER_KEYS
    (e.g. agg-tiers=0x2:kv:cpu_tier_mb=256:hints=1)."""
    numeric = {f.name for f in fields(PolicyConfig)} - {"kind", "seed"} | set(CLUSTER_KEYS)
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            name, rest = part.split("=", 1)
            shape, policy, *extra = rest.split(":")
            p, d = (int(x) for x in shape.lower().split("x"))
            overrides = tuple((k, float(v)) for k, v in (item.split("=") for item in extra))
        except ValueError as exc:
            raise ValueError(
                f"bad config {part!r}: expected name=PxD:policy[:key=value...], e.g. disagg-kv=1x1:kv"
            ) from exc
        if d < 1 or p < 0:
            raise ValueError(f"bad config {part!r}: need at least one decode worker")
        if policy not in ("kv", "round_robin", "least_loaded"):
            raise ValueError(f"bad config {part!r}: policy must be kv, round_robin or least_loaded")
        unknown = {k for k, _ in overrides} - numeric
        if unknown:
            raise ValueError(
                f"bad config {part!r}: unknown policy setting(s) {sorted(unknown)}; known: {sorted(numeric)}"
            )
        cluster = {k: v for k, v in overrides if k in CLUSTER_KEYS}
        overrides = tuple((k, v) for k, v in overrides if k not in CLUSTER_KEYS)
        cpu_mb, disk_mb = (int(cluster[k]) if k in cluster else None for k in ("cpu_tier_mb", "disk_tier_mb"))
        flags = {k: bool(cluster.get(k, 0)) for k in ("hints", "planner", "adaptive")}
        specs.append(ClusterSpec(name, p, d, policy, overrides, cpu_mb, disk_mb, **flags))
    if not specs:
        raise ValueError("no configurations given")
    return specs
