"""Cost-priced prefill placement (router/placement.py): each option's predicted time to first token from the
workers' own step-time models and chunk rules, the cold-start prior, and the decision the policy takes from it."""
import pytest

from disagg.engine.step_time import ChunkRule, StepCoefficients
from disagg.protocol import PricedFrom
from disagg.router.placement import Placement, WorkerTiming
from disagg.router.policy import PolicyConfig, PolicyKind, RoutingPolicy, WorkerLoad
from disagg.stats import WorkerStats

MODEL = StepCoefficients(base=0.02, per_token=0.002, per_seq=0.003, per_attn=0.001)
FIXED = ChunkRule(0.0, 512, 32, 16)
SIZED = ChunkRule(0.2, 512, 32, 16)  # a decode worker keeping its steps within a 200 ms TPOT


def _load(name, timing=None, active=0, blocks=0, queued=0, left=None):
    """`active` decoding requests with `left` output tokens to come between them (default: more than any prompt
    here takes)."""
    return WorkerLoad(
        name,
        active_requests=active,
        active_blocks=blocks,
        queued_prefill_tokens=queued,
        queued_compute_tokens=queued,
        timing=timing,
        decoding=active,
        decode_tokens_left=active * 10_000 if left is None else left,
    )


def _policy(placement=Placement.COST, **kw):
    return RoutingPolicy(PolicyConfig(kind=PolicyKind.KV, placement=placement, seed=0, **kw), block_size=16)


def test_an_idle_decode_worker_prefills_locally_a_busy_one_sends_the_prompt_away():
    prefill = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002))
    idle = _load("d0", WorkerTiming(MODEL, SIZED, 0.0002))
    d = _policy().choose(2000, {}, [idle], [prefill])
    assert d.prefill_worker is None and d.priced_from is PricedFrom.MEASURED  # no transfer, same speed
    assert d.predicted_ttft_s == pytest.approx(FIXED.prefill_seconds(MODEL, 2000, 0, 0))
    busy = _load("d0", WorkerTiming(MODEL, SIZED, 0.0002), active=24, blocks=24 * 40)
    d = _policy().choose(2000, {}, [busy], [prefill])
    assert d.prefill_worker == "p0" and d.reason.startswith("remote prefill")
    read = 0.0002 * 125  # the decode worker reads all 125 blocks
    assert d.predicted_ttft_s == pytest.approx(FIXED.prefill_seconds(MODEL, 2000, 0, 0) + read)
    # the same busy decode worker, but the prefill worker already has a long queue: local is faster now
    queued = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002), queued=40_000)
    d = _policy().choose(2000, {}, [busy], [queued])
    assert d.prefill_worker is None and "local prefill: predicted" in d.reason
    assert d.predicted_ttft_s == pytest.approx(SIZED.prefill_seconds(MODEL, 2000, 24, 24 * 40 * 16))


def test_the_threshold_rule_is_unchanged_and_still_predicts():
    busy = _load("d0", WorkerTiming(MODEL, SIZED, 0.0002), active=24, blocks=960)
    queued = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002), queued=4000)  # below the 8192-token queue limit
    d = _policy(Placement.THRESHOLD).choose(2000, {}, [busy], [queued])
    assert d.prefill_worker == "p0" and d.reason == "remote prefill"  # however long the queue's wait
    assert d.predicted_ttft_s == pytest.approx(FIXED.prefill_seconds(MODEL, 6000, 0, 0, prompt=2000) + 0.0002 * 125)


def test_a_cold_worker_is_priced_with_the_prior_never_as_free():
    config = PolicyConfig(placement=Placement.COST)
    warm = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002))
    cold = _load("d0")  # no heartbeat with a fitted model yet
    d = _policy().choose(2000, {}, [cold], [warm])
    assert d.priced_from is PricedFrom.PRIOR
    assert d.prefill_worker == "p0" and d.ttft_measured  # the decision had a cold option; the chosen one was measured
    local = FIXED.prefill_seconds(config.prior(), 2000, 0, 0)
    assert local > 0.5 and d.reason == f"remote prefill: predicted local {local:.3f} s, remote {d.predicted_ttft_s:.3f} s"
    # a worker reporting no model prices as the prior too (a worker that stopped measuring is not free)
    stopped = _load("p0", WorkerTiming(None, FIXED, None), queued=0)
    d = _policy().choose(2000, {}, [_load("d0", WorkerTiming(MODEL, SIZED, 0.0002), active=24, blocks=960)], [stopped])
    assert d.priced_from is PricedFrom.PRIOR
    assert d.prefill_worker is None or d.predicted_ttft_s >= FIXED.prefill_seconds(config.prior(), 2000, 0, 0)
    cold_local = _policy(Placement.THRESHOLD, min_remote_prefill_tokens=10**6).choose(2000, {}, [cold], [warm])
    assert cold_local.prefill_worker is None and not cold_local.ttft_measured  # priced from the prior: teaches none


def test_short_prompts_and_cached_prefixes_stay_local():
    prefill = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002))
    busy = _load("d0", WorkerTiming(MODEL, SIZED, 0.0002), active=24, blocks=960)
    assert _policy().choose(40, {}, [busy], [prefill]).prefill_worker is None  # < min_remote_prefill_tokens
    cached = _policy().choose(2000, {"d0": 124}, [busy], [prefill])  # 124 of 125 blocks cached on d0
    assert cached.prefill_worker is None and cached.reason.endswith("uncached tokens")


def test_a_heartbeat_carries_the_engine_model_and_chunk_rule_over_the_wire():
    stats = WorkerStats()
    stats.set_timing(MODEL, SIZED)
    stats.transfer_s_per_block = 0.0003
    back = WorkerStats.from_wire(stats.to_wire())
    assert back.step_model() == MODEL and back.chunk_rule(16) == SIZED and back.transfer_s_per_block == 0.0003
    cold = WorkerStats()
    cold.set_timing(None, FIXED)
    assert WorkerStats.from_wire(cold.to_wire()).step_model() is None
    assert WorkerStats().chunk_rule(16) is None  # a worker reporting no rule: the router's default


def test_decodes_that_finish_soon_let_a_local_prefill_run_at_full_speed():
    sized = WorkerTiming(MODEL, SIZED, 0.0002)
    lasting = _load("d0", sized, active=24, blocks=960)
    finishing = _load("d0", sized, active=24, blocks=960, left=24 * 3)  # 3 tokens each to go
    prefill = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002), queued=40_000)
    slow, fast = (_policy().choose(2000, {}, [d], [prefill]) for d in (lasting, finishing))
    assert slow.prefill_worker is None and fast.prefill_worker is None
    assert fast.predicted_ttft_s < slow.predicted_ttft_s / 2
    chunk = SIZED.tokens(MODEL, 24, 24, 24 * 40 * 16 / 1000, 0)
    alone = FIXED.prefill_seconds(MODEL, 2000 - 3 * chunk, 0, 0, prompt=2000)
    assert fast.predicted_ttft_s > alone  # three sized steps first, then full chunks


def test_with_a_ttft_target_a_prefill_worker_that_meets_it_wins_even_when_local_is_faster():
    idle = _load("d0", WorkerTiming(MODEL, SIZED, 0.0002))
    prefill = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002), queued=300)
    fastest = _policy().choose(1000, {}, [idle], [prefill])
    assert fastest.prefill_worker is None  # no queue, no transfer: local is the lowest TTFT
    targeted = _policy(ttft_target_s=4.0).choose(1000, {}, [idle], [prefill])
    assert targeted.prefill_worker == "p0" and targeted.predicted_ttft_s <= 4.0  # leaves the decode batch alone
    # the prefill worker would be late and local is in time: local; both late: the prefill worker
    late = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002), queued=5000)
    assert _policy(ttft_target_s=4.0).choose(1000, {}, [idle], [late]).prefill_worker is None
    assert _policy(ttft_target_s=1.0).choose(1000, {}, [idle], [late]).prefill_worker == "p0"


def test_flexible_an_idle_prefill_worker_takes_the_request_whole_when_the_decode_batch_is_full_for_the_tpot():
    """MODEL's decode step: 0.02 + 0.005 per sequence + 0.001 per thousand context tokens.  A decode worker with
    24 requests over 960 blocks steps in 0.16 s with one more; an idle prefill worker in 0.025 s."""
    busy = _load("d0", WorkerTiming(MODEL, SIZED, 0.0002), active=24, blocks=960)
    idle = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002))
    d = _policy(flexible=True, tpot_target_s=0.1).choose(2000, {"p0": 2}, [busy], [idle])
    assert (d.decode_worker, d.prefill_worker, d.flexible) == ("p0", None, True)
    assert d.reason.startswith("whole request on idle prefill worker") and "160 ms on d0" in d.reason
    assert d.overlap_blocks == 2 and d.priced_from is PricedFrom.MEASURED  # its own cache, its own fit
    assert d.predicted_ttft_s == pytest.approx(FIXED.prefill_seconds(MODEL, 2000 - 32, 0, 0, cached=32))
    # not taken: flexible off, no TPOT target, the decode batch has room, the prefill worker has a queue, or its
    # own decodes would break the target
    roomy = _load("d0", WorkerTiming(MODEL, SIZED, 0.0002), active=2, blocks=80)
    queued = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002), queued=100)
    decoding = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002), active=20, blocks=800)
    for policy, decode, prefill in [
        (_policy(tpot_target_s=0.1), busy, idle),
        (_policy(flexible=True), busy, idle),
        (_policy(flexible=True, tpot_target_s=0.1), roomy, idle),
        (_policy(flexible=True, tpot_target_s=0.1), busy, queued),
        (_policy(flexible=True, tpot_target_s=0.1), busy, decoding),
    ]:
        d = policy.choose(2000, {}, [decode], [prefill])
        assert d.decode_worker == "d0" and not d.flexible, d.reason
    with pytest.raises(ValueError, match="needs --placement cost"):
        PolicyConfig(placement=Placement.THRESHOLD, flexible=True)
    # only a taker the router offers (eligible, with room, not changing role) is used, and the session stays
    # unpinned from a decode worker it did not go to
    policy = _policy(flexible=True, tpot_target_s=0.1)
    d = policy.choose(2000, {}, [busy], [idle], session=("t", "s", None), takers=[])
    assert d.decode_worker == "d0" and not d.flexible
    d = policy.choose(2000, {}, [busy], [idle], session=("t", "s2", None))
    assert d.flexible and ("t", "s2", None) not in policy._sessions


def test_flexible_when_no_decode_worker_has_room_an_idle_taker_within_the_tpot_target_serves_it():
    idle = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002))
    decoding = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002), active=20, blocks=800)  # its step: 0.145 s
    d = _policy(flexible=True, tpot_target_s=0.1).whole_on_idle(1000, {"p0": 3}, [idle])
    assert d is not None and (d.decode_worker, d.flexible, d.overlap_blocks) == ("p0", True, 3)
    assert "no decode worker has room" in d.reason
    assert _policy(flexible=True, tpot_target_s=0.1).whole_on_idle(1000, {}, [decoding]) is None  # would break it
    assert _policy(flexible=True).whole_on_idle(1000, {}, [decoding]).decode_worker == "p0"  # no target: room only
    queued = _load("p0", WorkerTiming(MODEL, FIXED, 0.0002), queued=100)
    assert _policy(flexible=True).whole_on_idle(1000, {}, [queued]) is None


def test_a_prefill_worker_that_decodes_is_priced_with_its_decodes_as_a_remote_prefill():
    busy = _load("d0", WorkerTiming(MODEL, SIZED, 0.0002), active=24, blocks=960)
    sized = WorkerTiming(MODEL, SIZED, 0.0002)
    free, decoding = _load("p0", sized), _load("p0", sized, active=20, blocks=800)
    alone, beside = (_policy().choose(2000, {}, [busy], [p]) for p in (free, decoding))
    assert alone.prefill_worker == beside.prefill_worker == "p0"
    assert beside.predicted_ttft_s > 2 * alone.predicted_ttft_s  # its chunks sized beside its 20 decodes


def test_the_load_book_counts_decoding_requests_and_their_tokens_left():
    import threading

    from disagg.router.admission import CapacityConfig
    from disagg.protocol import Role
    from disagg.router.health import HealthConfig, HealthMonitor
    from disagg.router.index import TierMatch
    from disagg.router.load import LoadBook
    from disagg.router.decision import Decision

    loads = {"d0": _load("d0", left=0), "p0": _load("p0", left=0)}
    health = HealthMonitor(HealthConfig(), {"d0": Role.DECODE, "p0": Role.PREFILL})
    book = LoadBook(loads, health, CapacityConfig(), 16, ["p0"], threading.Lock())
    a = book.begin(Decision("d0", "p0", 0), 100, max_tokens=10)
    b = book.begin(Decision("d0", None, 0), 50, max_tokens=4)
    d0 = loads["d0"]
    assert (d0.decoding, d0.decode_tokens_left, loads["p0"].queued_prefill_tokens) == (0, 0, 100)
    c = book.begin(Decision("d0", None, 3, match=TierMatch(device=3)), 100, max_tokens=2)  # 3 blocks cached on d0: 52 tokens to compute
    assert (loads["p0"].queued_compute_tokens, d0.queued_compute_tokens, d0.queued_prefill_tokens) == (100, 102, 150)
    book.end(c)
    assert (d0.queued_compute_tokens, d0.queued_prefill_tokens) == (50, 50)
    book.progress(a, 1)  # its first token: decoding, 9 to go
    assert (d0.decoding, d0.decode_tokens_left, loads["p0"].queued_prefill_tokens) == (1, 9, 0)
    book.progress(a, 5)
    book.progress(b, 2)
    assert (d0.decoding, d0.decode_tokens_left) == (2, 5 + 2)
    book.end(b)
    assert (d0.decoding, d0.decode_tokens_left) == (1, 5)
    book.end(a)
    assert (d0.decoding, d0.decode_tokens_left, d0.active_requests) == (0, 0, 0)


def test_a_short_remainder_is_priced_as_its_own_tokens_and_its_cached_prefix():
    """A step carries the tokens left, not a whole chunk: 15 uncached tokens after 2,032 cached on an idle worker
    are one step of 15 tokens plus their attention over the prefix (they were priced as a 512-token step, 1.34 s
    against a 95 ms first token, and the simulated agent cells' median TTFT error was 4.6x)."""
    idle = _load("d0", WorkerTiming(MODEL, FIXED, 0.0002))
    d = _policy().choose(2047, {"d0": 127}, [idle], [])
    step = MODEL.predict(15, 1, 15 * (2032 + 15) / 1000)  # the engine's key pairs: n x (computed + n)
    assert d.prefill_worker is None and d.predicted_ttft_s == pytest.approx(step)
    # a prompt of two equal chunks: each its own tokens, attention 512 x 512 + 512 x 1024 key pairs as the engine
    # counts them chunk by chunk
    assert FIXED.prefill_seconds(MODEL, 1024, 0, 0) == pytest.approx(
        2 * MODEL.predict(0, 1, 0) + MODEL.per_token * 1024 + MODEL.per_attn * (512 * 512 + 512 * 1024) / 1000
    )


def test_the_prior_is_the_committed_calibration_of_the_default_model():
    """A cold worker is priced with the prior: it tracks bench/results/time_model.json (the default model on a
    2-core CPU), so a recalibration that moves it shows here (it had drifted: 50 ms base against 32 ms)."""
    import json
    from pathlib import Path

    fitted = json.loads((Path(__file__).parents[1] / "bench/results/time_model.json").read_text())
    prior = PolicyConfig().prior()
    for name in ("base", "per_token", "per_seq", "per_attn"):
        assert getattr(prior, name) == pytest.approx(fitted[name], rel=0.05), name


def test_the_correction_is_its_largest_cluster_s_median_bounded_and_off_until_enough_outcomes():
    from disagg.router.correction import CorrectionConfig, TtftCorrection, best_factor

    c = TtftCorrection(CorrectionConfig(window=5, min_samples=3, low=0.5, high=4.0))
    c.record("w", 1.0, 1.3)
    c.record("w", 1.0, 1.2)
    assert c.factor("w") == 1.0  # two outcomes: not yet
    c.record("w", 2.0, 20.0)  # one wild outcome (10x) does not drag the factor (a mean would be 4.2)
    assert c.factor("w") == pytest.approx(1.2)
    for _ in range(5):  # the window slides: only the last 5 count
        c.record("w", 1.0, 0.1)
    assert c.factor("w") == 0.5  # clamped
    for actual in (0.9, 1.0, 1.1, 1.8, 2.0):  # most predictions right, two slow: it stays at 1 (a median: 1.1)
        c.record("w", 1.0, actual)
    assert c.factor("w") == 1.0
    for actual in (1.1, 1.25, 1.3, 1.4, 0.5):  # a worker running 10-40% slow, one stall-free outlier
        c.record("w", 1.0, actual)
    assert c.factor("w") == pytest.approx(1.3)  # the least median error: 7%, against 22% uncorrected
    assert best_factor([1.0, 2.0, 0.5]) == 1.0  # 1 and 0.5 both leave a median error of 50%: the one nearer 1
    assert c.factor("never-seen") == 1.0
    off = TtftCorrection(CorrectionConfig(window=0))
    for _ in range(10):
        off.record("w", 1.0, 3.0)
    assert off.factor("w") == 1.0


def test_a_worker_whose_outcomes_ran_slow_is_priced_so_and_the_decision_carries_its_factor():
    """Two equally fast options: the decode worker's local prefill wins a tie, until its outcomes show it running
    at 2x its model; then the prefill worker's (corrected at 1x) is cheaper, and predictions carry the factor."""
    prefill = _load("p0", WorkerTiming(MODEL, FIXED, 0.0))
    decode = _load("d0", WorkerTiming(MODEL, FIXED, 0.0))
    policy = _policy()
    raw = FIXED.prefill_seconds(MODEL, 2000, 0, 0)
    d = policy.choose(2000, {}, [decode], [prefill])
    assert d.prefill_worker is None and (d.predicted_ttft_s, d.ttft_factor) == (pytest.approx(raw), 1.0)
    for _ in range(4):
        policy.correction.record("d0", raw, 2 * raw)
    d = policy.choose(2000, {}, [decode], [prefill])
    assert d.prefill_worker == "p0" and d.ttft_factor == 1.0
    threshold = _policy(Placement.THRESHOLD, min_remote_prefill_tokens=10**6)  # always local
    for _ in range(4):
        threshold.correction.record("d0", raw, 2 * raw)
    d = threshold.choose(2000, {}, [decode], [prefill])
    assert d.prefill_worker is None and d.ttft_factor == 2.0 and d.predicted_ttft_s == pytest.approx(2 * raw)


def test_the_core_s_finished_requests_teach_the_policy_s_correction():
    """The router core hands its LatencyWindow the policy's correction: what apply_latency records (both
    drivers) is what the placement prices with."""
    from disagg.router.router import RouterCore

    core = RouterCore({}, {"d0": None}, PolicyConfig(seed=0), 16)
    assert core.latency.correction is core.policy.correction is core.policy.placement.correction
