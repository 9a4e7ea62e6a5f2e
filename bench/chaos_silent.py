"""Silent faults for `disagg bench chaos` (bench/chaos.py): a worker that answers wrong or slowly, injected into a
running Ray worker through its `set_faults` actor call (cluster/worker.py; the bench starts its workers with
`allow_fault_injection`, which `disagg serve` never does).

  corrupt-weights  one decoder layer's weights scaled by 4 (finite, plausible, wrong tokens): the canaries'
                   to catch (router/canary.py; needs --canary); goal: out of routing within 10 s, and no wrong
                   answer served after that
  nan-logits       NaN logits on every step from the next one: the worker fails the request with OutputCorrupt
                   (it migrates) and takes itself out; goal: no request lost
  slow-5x          every model step stretched 5x (a gray failure): the outlier detector's to catch
                   (router/outliers.py; needs --gray-failures); goal: drained within 30 s

Detection time is from the injection to the router's health event that took the worker out of routing (DEAD for
the first two, DRAINED for a slow one).  A killed worker comes back clean (Ray restarts the process; the faults
were this incarnation's); a drained slow worker has its fault cleared by the bench after detection, as an operator
would fix the node, and comes back when the detector sees it within its peers again.

"Wrong answers served after detection": outputs that differ from the clean run among the requests that started
after the worker left routing and before the next injection (prompts do not depend on earlier outputs, so any of
them differing is a wrong answer served after detection).  The canary settings the bench uses are below
(CHAOS_CANARY): faster than `disagg serve --canary`'s defaults, so that two canaries in a row (fail_after) fit in
the 10 s goal under load.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from disagg.cluster.worker_config import FaultOrder
from disagg.config import FaultConfig
from disagg.workload.metrics import RequestRecord

if TYPE_CHECKING:
    from bench.chaos import Fault, Observer

SLOW_FACTOR = 5.0  # the gray failure: a worker slowed 5x
CORRUPT_SCALE = 4.0  # one layer's weights x4: finite logits, wrong greedy tokens (tests/test_silent_failures.py)
SILENT_FAULTS: dict[str, FaultConfig] = {
    "corrupt-weights": FaultConfig(corrupt_layer=0, corrupt_scale=CORRUPT_SCALE),
    "nan-logits": FaultConfig(nan_from_step=1),  # counted from the injection: the next step on
    "slow-5x": FaultConfig(slow_factor=SLOW_FACTOR),
}
# the router health state that takes each kind's worker out of routing
OUT_STATE = {"corrupt-weights": "dead", "nan-logits": "dead", "slow-5x": "drained"}
# the goals: seconds from injection to out of routing (None: none set; NaN's goal is no request lost)
DETECT_GOAL_S: dict[str, float | None] = {"corrupt-weights": 10.0, "nan-logits": None, "slow-5x": 30.0}
# which detector each kind needs switched on (the bench refuses to run a kind nothing can catch)
NEEDS = {"corrupt-weights": "canary", "slow-5x": "gray_failures"}
# the bench's canary pace: an idle worker every 1 s, a busy one every 2 s, so that fail_after (2) wrong answers
# in a row come within the 10 s goal under load (`disagg serve --canary`: CanaryConfig's defaults)
CHAOS_CANARY = {"idle_interval_s": 1.0, "busy_interval_s": 2.0}


def is_silent(kind: str) -> bool:
    return kind in SILENT_FAULTS


def inject_silent(kind: str, actor: Any) -> None:
    import ray

    ray.get(actor.set_faults.remote(FaultOrder(SILENT_FAULTS[kind]).to_wire()), timeout=30)


def await_silent(fault: Fault, actor: Any, observer: Observer, timeout_s: float) -> None:
    """Wait for the worker to leave routing (detection), then to be READY again: restarted (DEAD kinds) or, for
    a slow one, its fault cleared here and undrained by the detector."""
    import ray

    deadline = time.time() + timeout_s
    out = None
    while time.time() < deadline and out is None:
        out = observer.first_event(fault.target, OUT_STATE[fault.kind], fault.at)
        time.sleep(0.1)
    if out is None:
        fault.note = "not taken out of routing in time"
        ray.get(actor.set_faults.remote(FaultOrder(None).to_wire()), timeout=30)  # let the next injection start
        return
    fault.out_of_routing_s = out - fault.at
    if fault.kind == "slow-5x":
        ray.get(actor.set_faults.remote(FaultOrder(None).to_wire()), timeout=30)
    while time.time() < deadline:
        ready = observer.first_event(fault.target, "ready", out)
        if ready is not None:
            fault.ready_s = ready - fault.at
            return
        time.sleep(0.1)
    fault.note = "not back in routing in time"


def wrong_after_detection(
    fault: Fault, next_at: float | None, records: list[RequestRecord], started_at: float, reference: dict[int, Any]
) -> int | None:
    """Outputs that differ from the clean run among the requests that started after `fault`'s worker left
    routing and before the next injection (None: it never left)."""
    if fault.out_of_routing_s is None:
        return None
    since = fault.at + fault.out_of_routing_s
    return sum(
        1
        for r in records
        if r.ok
        and since <= started_at + r.start_s < (next_at if next_at is not None else float("inf"))
        and r.text != reference[r.index].text
    )


def healthy_outs(events: list[dict], faults: list[Fault], start: float, end: float, settle_s: float) -> list[dict]:
    """Health events between `start` and `end` that took a worker out of routing (DEAD or DRAINED) with no
    injected fault to explain it: a fault's own target within `settle_s` of its injection is explained.  On a
    clean run (no faults) every such event is a false positive."""
    out = []
    for e in events:
        if e["state"] not in ("dead", "drained") or not start <= e["wall_time"] <= end:
            continue
        if any(f.target == e["worker"] and f.at <= e["wall_time"] <= f.at + settle_s for f in faults):
            continue
        out.append({k: e[k] for k in ("worker", "state", "reason", "wall_time")})
    return out


def check_detectors(kinds: list[str], canary: bool, gray_failures: bool) -> None:
    on = {"canary": canary, "gray_failures": gray_failures}
    missing = sorted(f"{k} needs --{NEEDS[k].replace('_', '-')}" for k in kinds if k in NEEDS and not on[NEEDS[k]])
    if missing:
        raise SystemExit(f"nothing would catch these faults: {'; '.join(missing)}")
