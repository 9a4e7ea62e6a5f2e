"""The pure parts of catching silent failures: canary verdicts by majority, when canaries are due, the gray-failure
outlier detector and its hysteresis, the monitor's drain / condemn transitions, and what the engine refuses to
serve (no Ray, no HTTP, no model)."""
import math

import pytest
import torch

from disagg.config import FaultConfig
from disagg.engine.faults import NONFINITE_TOKEN, FaultInjector, output_fault
from disagg.protocol import Role
from disagg.router.canary import CanaryBook, CanaryConfig, Verdict, canary_due
from disagg.router.health import Action, HealthConfig, HealthMonitor, WorkerState
from disagg.router.outliers import OutlierConfig, OutlierDetector, Sample
from disagg.stats import Heartbeat

GOOD, BAD = [5, 6, 7], [9, 9, 9]


def test_the_reference_is_the_first_majority_answer_and_settles_earlier_answers():
    book = CanaryBook(3, CanaryConfig(fail_after=1))
    assert book.record("bad", BAD) == {"bad": Verdict.PENDING}  # one worker cannot set the reference
    assert book.record("a", GOOD) == {"a": Verdict.PENDING}  # 1 vs 1 of 3: no majority yet
    assert book.record("b", GOOD) == {"bad": Verdict.FAIL, "a": Verdict.PASS, "b": Verdict.PASS}
    assert book.reference == tuple(GOOD)
    assert book.record("a", GOOD) == {"a": Verdict.PASS}


def test_a_minority_that_agrees_cannot_set_the_reference():
    book = CanaryBook(5, CanaryConfig())
    book.record("x", BAD)
    assert book.record("y", BAD) == {"y": Verdict.PENDING}  # 2 of 5 is no majority
    assert book.reference is None


def test_a_worker_is_condemned_only_after_fail_after_wrong_answers_in_a_row():
    book = CanaryBook(3, CanaryConfig(fail_after=2))
    book.record("a", GOOD)
    book.record("b", GOOD)
    assert book.record("c", BAD) == {"c": Verdict.WRONG}  # a near-tie flipped once under load: not yet
    assert book.record("c", GOOD) == {"c": Verdict.PASS}  # the streak resets
    assert book.record("c", BAD) == {"c": Verdict.WRONG}
    assert book.record("c", BAD) == {"c": Verdict.FAIL}
    book.forget("c")  # a new incarnation starts clean; the reference stays
    assert book.record("c", BAD) == {"c": Verdict.WRONG} and book.reference == tuple(GOOD)


def test_canaries_are_due_at_once_then_rarely_under_load():
    cfg = CanaryConfig(idle_interval_s=1.0, busy_interval_s=10.0)
    assert canary_due(None, 0.0, busy=True, config=cfg)
    assert not canary_due(5.0, 5.5, busy=False, config=cfg) and canary_due(5.0, 6.0, busy=False, config=cfg)
    assert not canary_due(5.0, 14.0, busy=True, config=cfg) and canary_due(5.0, 15.0, busy=True, config=cfg)


def _samples(slow: float, running=(2, 2, 2), role=Role.DECODE):
    return [Sample("a", role, slow, running[0]), Sample("b", role, 1.0, running[1]),
            Sample("c", role, 1.1, running[2])]


def test_an_outlier_is_drained_after_bad_checks_in_a_row_and_returns_after_good_checks():
    det = OutlierDetector(OutlierConfig(ratio=3.0, bad_checks=3, good_checks=2))
    assert det.check(_samples(5.0)) == [] and det.check(_samples(5.0)) == []
    assert det.check(_samples(1.0)) == []  # noise: the streak starts again
    assert det.check(_samples(5.0)) == [] and det.check(_samples(5.0)) == []
    changes = det.check(_samples(5.0))
    assert [(c.worker, c.drain) for c in changes] == [("a", True)] and "4.8x" in changes[0].reason  # 5.0 over the median 1.05
    assert det.check(_samples(5.0)) == []  # already drained: reported once
    assert det.check(_samples(1.2)) == []
    assert [(c.worker, c.drain) for c in det.check(_samples(1.2))] == [("a", False)]


def test_outliers_are_judged_against_peers_of_the_same_role_and_a_similar_load():
    det = OutlierDetector(OutlierConfig(ratio=3.0, bad_checks=1, load_ratio=2.0, load_slack=1))
    assert det.check(_samples(5.0, running=(20, 2, 2))) == []  # a busy worker is not compared with idle ones
    mixed = [Sample("a", Role.PREFILL, 5.0, 2), Sample("b", Role.DECODE, 1.0, 2)]
    assert det.check(mixed) == []  # no peer of its role
    assert det.check([Sample("a", Role.DECODE, None, 2), Sample("b", Role.DECODE, 1.0, 2)]) == []  # not measured


def test_a_drained_worker_is_no_peer_and_the_last_of_its_role_is_never_drained():
    det = OutlierDetector(OutlierConfig(ratio=2.0, bad_checks=1))
    two = [Sample("a", Role.BOTH, 3.0, 1), Sample("b", Role.BOTH, 1.0, 1)]
    assert [c.worker for c in det.check(two)] == ["a"]
    # b is now compared with no one (a is drained): it stays, however its numbers move
    assert det.check([Sample("a", Role.BOTH, 3.0, 1), Sample("b", Role.BOTH, 9.0, 1)]) == []
    det.forget("a")  # restarted: a clean record
    assert "a" not in det.drained


def _hb(**kw):
    fields = dict(worker="w", incarnation="i1", role="both", pid=1, node_id="n", steps=1, has_work=False,
                  step_busy_s=0.0, consecutive_step_failures=0, agent_name="w-i1")
    fields.update(kw)
    return Heartbeat(**fields)


def test_the_monitor_drains_brings_back_and_condemns():
    changes = []
    m = HealthMonitor(HealthConfig(), {"w": Role.BOTH}, clock=lambda: 0.0,
                      on_change=lambda name, old, new: changes.append(new))
    m.on_heartbeat("w", _hb())
    assert m.drain("w", "slow") and not m.routable("w") and not m.is_dead("w")  # its streams finish
    assert m.on_heartbeat("w", _hb()) is Action.NONE and m.workers["w"].state is WorkerState.DRAINED
    assert not m.drain("w", "again") and m.undrain("w", "fine") and m.routable("w")
    assert m.condemn("w", "wrong canary answer") is Action.KILL and m.is_dead("w")
    assert m.condemn("w", "twice") is Action.NONE  # killed once per incarnation
    assert changes == [WorkerState.DRAINED, WorkerState.READY, WorkerState.DEAD]


def test_an_unhealthy_heartbeat_with_a_fault_kills_with_that_reason():
    m = HealthMonitor(HealthConfig(), {"w": Role.BOTH}, clock=lambda: 0.0)
    m.on_heartbeat("w", _hb())
    assert m.on_heartbeat("w", _hb(healthy=False, fault="impossible output: NaN")) is Action.KILL
    assert m.workers["w"].reason == "impossible output: NaN"


def test_output_faults_and_the_nan_injector():
    assert output_fault(3, 10) is None
    assert "non-finite" in output_fault(NONFINITE_TOKEN, 10)
    assert "outside the vocabulary" in output_fault(10, 10)
    inj = FaultInjector(FaultConfig(nan_every=2))
    logits = torch.zeros(2, 4)
    assert torch.isfinite(inj.logits(logits)).all()
    assert torch.isnan(inj.logits(logits)).all() and inj.injected_nan == 1
    late = FaultInjector(FaultConfig(nan_from_step=2))
    assert [bool(torch.isnan(late.logits(logits)).any()) for _ in range(3)] == [False, True, True]
    with pytest.raises(ValueError):
        FaultConfig(slow_factor=0.5)
    assert not math.isnan(FaultConfig().slow_factor)


def test_a_worker_taken_out_for_impossible_output_is_killed_at_its_next_heartbeat():
    m = HealthMonitor(HealthConfig(), {"w": Role.BOTH}, clock=lambda: 0.0)
    m.on_heartbeat("w", _hb())
    m.take_out("w", "w: impossible output for r: non-finite logits (NaN or Inf)")
    assert m.is_dead("w")  # at once: the request's retry cannot land there again
    assert m.on_heartbeat("w", _hb(healthy=False, fault="impossible output")) is Action.KILL


def test_a_prefill_worker_serving_whole_requests_is_judged_against_decoders_not_prefill_peers():
    """Flexible workers: a prefill worker decoding whole requests steps at decode speed per token, tens of times
    its prefill peers'; the gray-failure check compares it with the decode workers instead."""
    from types import SimpleNamespace

    from disagg.router.watch import SilentConfig, SilentFailureWatch
    from disagg.stats import WorkerStats

    roles = {"p": Role.PREFILL, "q": Role.PREFILL, "d": Role.DECODE}
    m = HealthMonitor(HealthConfig(), roles, clock=lambda: 0.0)
    per_token = {"p": 0.02, "q": 0.0005, "d": 0.02}
    for name, role in roles.items():
        stats = WorkerStats(step_s_per_token=per_token[name], running=2)
        m.on_heartbeat(name, _hb(worker=name, role=role.value, stats=stats))
    loads = {n: SimpleNamespace(decoding=2 if n in "pd" else 0) for n in roles}
    seen = []

    async def enforce(name, action):
        pass
    for given in (None, loads):
        watch = SilentFailureWatch(SilentConfig(), m, {}, lambda n: True, enforce, given)
        watch.detector.check = lambda samples: seen.append({s.worker: s.role for s in samples}) or []
        watch._check_outliers()
    assert seen == [roles, {**roles, "p": Role.DECODE}]
