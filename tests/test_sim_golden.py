"""The simulator gives the same outputs for the same seed across refactors: a committed golden summary.

Each scenario replays a seeded agent trace through the simulated cluster and is summarised by a digest of every
request's record (TTFT, E2E, ITLs, cached and output tokens, refusals) plus the run's counters.  The scenarios
cover the paths the simulator owns: aggregated and disaggregated routing, event jitter and snapshots, KV tiers
with session pins, the admission queue, the planner moving roles, and killed workers with migration.

A deliberate behaviour change regenerates the file:  DISAGG_WRITE_GOLDEN=1 pytest tests/test_sim_golden.py
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from disagg.sim.spec import ClusterSpec
from disagg.router.admission import AdmissionConfig
from disagg.router.policy import PolicyConfig, PolicyKind
from disagg.sim.cluster import SimClusterConfig
from disagg.sim.faults import SimChaos
from disagg.sim.run import simulate
from disagg.sim.spec import ClusterSpec
from disagg.sim.timemodel import StepTimeModel
from disagg.workload import agent
from disagg.workload.metrics import SLO
from disagg.workload.record import TraceScale

GOLDEN = Path(__file__).parent / "data" / "sim_golden.json"
MODEL = StepTimeModel()
SCALE = TraceScale(block_tokens=16, max_input_tokens=900, max_output_tokens=64)
KV = PolicyConfig(kind=PolicyKind.KV, seed=0)
ROUND_ROBIN = PolicyConfig(kind=PolicyKind.ROUND_ROBIN, seed=0)


def _scenarios() -> dict[str, tuple[SimClusterConfig, TraceScale, SimChaos | None]]:
    busy = TraceScale(**{**SCALE.__dict__, "time_scale": 3.0})
    planner = ClusterSpec("dyn", 2, 6, "kv", planner=True).planner_config(SLO(2000, 200))
    return {
        "aggregated_kv": (SimClusterConfig(num_decode=4, num_blocks=364, policy=KV), SCALE, None),
        "aggregated_round_robin": (SimClusterConfig(num_decode=4, num_blocks=364, policy=ROUND_ROBIN),
                                   SCALE, None),
        "disaggregated_jitter_cores": (SimClusterConfig(num_prefill=2, num_decode=4, num_blocks=364, policy=KV,
                                                        event_jitter_s=0.05, cores=4, handoff_overhead_s=0.01),
                                       busy, None),
        "tiers_and_pins": (SimClusterConfig(num_decode=2, num_blocks=128, max_model_len=1024, policy=KV,
                                            cpu_tier_blocks=512, disk_tier_blocks=512, session_hints=True),
                           SCALE, None),
        "admission_queue": (SimClusterConfig(num_decode=2, num_blocks=200, policy=KV, admission=AdmissionConfig()),
                            busy, None),
        "planner": (SimClusterConfig(num_prefill=2, num_decode=6, num_blocks=364, policy=KV, planner=planner),
                    busy, None),
        "chaos": (SimClusterConfig(num_prefill=2, num_decode=6, num_blocks=512, policy=KV), SCALE,
                  SimChaos(kill_fraction=0.25, at_s=5.0, detect_s=1.3, restart_s=8.5, seed=2)),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 9)


def _summary(config: SimClusterConfig, scale: TraceScale, chaos: SimChaos | None) -> dict:
    trace = agent.generate(agent.parse_mix("coding_agent:2,short_chat:1"), 30, 2.0, seed=0)
    result = simulate(trace, scale, config, MODEL, chaos=chaos)
    rows = [[r.index, r.prompt_tokens, _round(r.start_s), _round(r.ttft_s), _round(r.e2e_s), r.output_tokens,
             r.cached_tokens, r.error, r.refusal_code, [_round(x) for x in r.itl_s]]
            for r in sorted(result.records, key=lambda r: r.index)]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    counters = json.loads(json.dumps(result.counters, default=str, sort_keys=True))
    return {"requests": len(rows), "ok": sum(r.ok for r in result.records), "duration_s": _round(result.duration_s),
            "records_sha256": digest, "hit_ratio": _round(result.prefix_cache.get("hit_ratio")),
            "counters": counters}


@pytest.mark.parametrize("name", sorted(_scenarios()))
def test_simulation_matches_the_golden_summary(name):
    config, scale, chaos = _scenarios()[name]
    got = _summary(config, scale, chaos)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("DISAGG_WRITE_GOLDEN"):
        golden[name] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert got == golden[name]
