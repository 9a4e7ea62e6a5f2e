"""The planner's decisions on synthetic signals (pure logic, hand-checked), its hysteresis bound, and the
latency window it reads SLO attainment from."""
from dataclasses import replace

import pytest

from disagg.planner.policy import Hold, Move, Planner, PlannerConfig, Reason, Signals, WorkerSignal
from disagg.protocol import Role
from disagg.router.latency import LatencyWindow

ON = dict(enabled=True, min_samples=4, cooldown_s=10, min_dwell_s=20, reversal_window_s=120, confirm_rounds=1)


LIMIT = 4096  # CapacityConfig.max_prefill_queue_tokens: the router sends no more remote prefills past it


def w(name, role, queued=0, active=0, max_running=8, tok_s=1000.0):
    return WorkerSignal(name, role, True, queued, active, max_running, None, tok_s, prefill_queue_limit=LIMIT)


def signals(workers, ttft=1.0, tpot=1.0, finished=50, now=100.0):
    return Signals(now, workers, ttft, tpot, finished)


def test_off_by_default_and_says_so():
    assert Planner().decide(signals([w("p", Role.PREFILL), w("d", Role.DECODE)])) is Hold.DISABLED


def test_tpot_missed_with_prefill_interference_moves_the_least_loaded_decoder_to_prefill():
    # decode workers are prefilling prompts themselves (tokens queued on them) and TPOT suffers: isolate prefill
    # because the prefill pool is full (the router keeps prompts local only then, or when they are short)
    s = signals([w("p0", Role.PREFILL, queued=LIMIT), w("d0", Role.DECODE, queued=800, active=3),
                 w("d1", Role.DECODE, active=1)], ttft=0.99, tpot=0.5)
    move = Planner(PlannerConfig(**ON)).decide(s)
    assert isinstance(move, Move)
    assert (move.worker, move.old, move.new, move.reason) == ("d1", Role.DECODE, Role.PREFILL,
                                                              Reason.PREFILL_INTERFERENCE)
    assert "tpot_ok=50%" in move.detail and "decoders_prefilling=800tok" in move.detail


def test_prompts_decode_workers_keep_by_design_are_no_interference_a_split_can_fix():
    """The prefill pool has room: the prompts on decode workers are ones the router keeps local (short, mostly
    cached), and more prefill workers would not take them.  TPOT is missed, so decode is short: the pool gives a
    worker to decode instead (measured: counting them drained 41P:23D to 63P:1D at a 50 ms TPOT SLO)."""
    workers = [w("p0", Role.PREFILL, queued=600), w("p1", Role.PREFILL, queued=100),  # 0.35 s of wait
               w("d0", Role.DECODE, queued=800, active=3), w("d1", Role.DECODE, queued=60, active=1)]
    move = Planner(PlannerConfig(**ON)).decide(signals(workers, ttft=0.99, tpot=0.5))
    assert (move.workers, move.new, move.reason) == (["p1"], Role.DECODE, Reason.DECODE_SATURATED)
    # and none when the prompts left would wait past prefill_wait_high_s (1 s): 1.7 s already
    deep = [w("p0", Role.PREFILL, queued=1700), w("p1", Role.PREFILL, queued=1700), *workers[2:]]
    assert Planner(PlannerConfig(**ON)).decide(signals(deep, ttft=0.99, tpot=0.5)) is Hold.PREFILL_HEADROOM


def test_decode_steps_well_within_the_tpot_slo_say_decode_is_not_what_is_short():
    """TPOT missed while the decoders' measured steps alone take 30 ms of a 200 ms SLO: the misses come from the
    prompts prefilled beside them (kept local by the router while the pool has room), and a prefill worker moved
    to decode would not take those.  (In the simulator's agent cell at 16 workers the old rule moved the one
    prefill worker back at decode load 0.10, and the arm ended 0.94x of aggregated; docs/benchmarks.md.)  Steps
    near the SLO still add a decoder."""
    def cluster(step):
        return [w("p0", Role.PREFILL, queued=0), w("p1", Role.PREFILL, queued=0),
                replace(w("d0", Role.DECODE, queued=800, active=1), decode_step_s=step),
                replace(w("d1", Role.DECODE, queued=60, active=1), decode_step_s=step)]
    planner = Planner(PlannerConfig(**ON))
    assert all(planner.decide(signals(cluster(0.03), ttft=0.99, tpot=0.5)) is Hold.DECODE_NOT_FULL for _ in range(3))
    move = Planner(PlannerConfig(**ON)).decide(signals(cluster(0.15), ttft=0.99, tpot=0.5))  # 0.75 of the SLO
    assert (move.new, move.reason) == (Role.DECODE, Reason.DECODE_SATURATED)


@pytest.mark.parametrize("queued, active, moved", [(4700, 1, 4), (1500, 1, 1), (4700, 6, 0)])
def test_an_interference_split_scales_with_the_decoders_backlog_and_keeps_decode_room(queued, active, moved):
    """An aggregated cluster whose decoders each hold k x prefill_wait_high_s of prompts splits k steps at once
    (at most 4): one worker at a time, the agent cell's split came 4 rounds late and was undone before the next.
    Only from decode load under decode_load_low: a busy decode pool loses more capacity than isolation gains (at
    2x the conversation load the old rule split 12 of 16 workers off: 0.89x of aggregated)."""
    workers = [w(f"d{i:02d}", Role.BOTH, queued=queued, active=active) for i in range(16)]  # 1,000 tokens/s each
    decision = Planner(PlannerConfig(**ON)).decide(signals(workers, ttft=0.99, tpot=0.5))
    if moved:
        assert (decision.new, decision.reason, len(decision.workers)) == (Role.PREFILL,
                                                                          Reason.PREFILL_INTERFERENCE, moved)
    else:  # load 6 / 8 = 0.75
        assert decision is Hold.DECODE_HEADROOM


def test_an_interference_split_is_sized_from_the_confirming_rounds_mean_backlog():
    """The decoders' prompt backlog swings round to round; sized from the last round alone, the agent cell at 16
    simulated workers split 1 worker off at a 1.3 s wait (rounds of 0.7 s, 4.7 s, 1.3 s) and 4 more 32 s later
    (0.96x of aggregated; 1.01x sized from the rounds' mean).  The mean of the 3 confirming rounds, 2.2 s: 2 steps."""
    planner = Planner(PlannerConfig(**{**ON, "confirm_rounds": 3}))
    decisions = [planner.decide(signals([w(f"d{i:02d}", Role.BOTH, queued=q, active=1) for i in range(16)],
                                        ttft=0.99, tpot=0.5, now=100.0 + 2 * k))
                 for k, q in enumerate((700, 4700, 1300))]
    assert decisions[:2] == [Hold.CONFIRMING, Hold.CONFIRMING]
    assert (decisions[2].reason, len(decisions[2].workers)) == (Reason.PREFILL_INTERFERENCE, 2)


@pytest.mark.parametrize("step, moved", [(None, 24), (0.040, 12), (0.046, 0)])
def test_a_backlog_move_leaves_the_decoders_steps_within_the_tpot_slo(step, moved):
    """Slots and KV are not all a decoder has to spare: at a 50 ms TPOT SLO the agent load (64 simulated workers)
    moved 42 of 48 decoders to prefill while each step already took 40 ms, and the rest then missed TPOT (both
    SLOs failed; as a static split that end state serves 8.8 req/s against 32.6 for 45P:19D).  Each decoder's 4
    streams, spread over the rest, grow their step by 3.5 ms per stream: 12 of 48 may leave before it passes
    0.9 x 50 ms (13 would give 45.2 ms); none from 46 ms; unmeasured steps bound nothing (the 6 s backlog's 24)."""
    def decoder(i):
        return replace(w(f"d{i:02d}", Role.DECODE, active=4, max_running=16), decode_step_s=step,
                       decode_seq_s=None if step is None else 0.0035)
    workers = [w(f"p{i}", Role.PREFILL, queued=6000) for i in range(16)] + [decoder(i) for i in range(48)]
    decision = Planner(PlannerConfig(**ON, tpot_slo_s=0.05)).decide(signals(workers, ttft=0.99, tpot=0.99))
    if moved:
        assert (decision.new, decision.reason, len(decision.workers)) == (Role.PREFILL, Reason.PREFILL_BACKLOG, moved)
    else:
        assert decision is Hold.DECODE_HEADROOM


def test_an_interference_split_reads_the_decoders_backlog_not_the_full_pools():
    """Rule 2 fires with the prefill pool full, whose wait is deep by definition (4.1 s here): the steps it takes
    come from the prompts on the decoders (0.8 s: one step), not from the pool's queue (which would say 4)."""
    workers = [w("p0", Role.PREFILL, queued=LIMIT)] + \
        [w(f"d{i:02d}", Role.DECODE, queued=800 if i == 0 else 0, active=1) for i in range(15)]
    move = Planner(PlannerConfig(**ON)).decide(signals(workers, ttft=0.99, tpot=0.5))
    assert (move.new, move.reason, len(move.workers)) == (Role.PREFILL, Reason.PREFILL_INTERFERENCE, 1)


def test_a_decode_not_full_hold_breaks_the_confirmation_streak():
    """A rule-3 move needs confirm_rounds rounds in a row of it: a round that holds because decode is not full
    starts the count again."""
    def cluster(step):
        return [w("p0", Role.PREFILL), w("p1", Role.PREFILL),
                replace(w("d0", Role.DECODE, active=1), decode_step_s=step)]
    planner = Planner(PlannerConfig(**{**ON, "confirm_rounds": 2}))
    assert planner.decide(signals(cluster(0.15), tpot=0.5)) is Hold.CONFIRMING
    assert planner.decide(signals(cluster(0.03), tpot=0.5)) is Hold.DECODE_NOT_FULL
    assert planner.decide(signals(cluster(0.15), tpot=0.5)) is Hold.CONFIRMING
    assert planner.decide(signals(cluster(0.15), tpot=0.5)).reason is Reason.DECODE_SATURATED


def test_tpot_missed_without_interference_adds_a_decoder():
    s = signals([w("p0", Role.PREFILL, queued=100), w("p1", Role.PREFILL, queued=0), w("d0", Role.DECODE, active=8)],
                ttft=1.0, tpot=0.6)
    move = Planner(PlannerConfig(**ON)).decide(s)
    assert (move.worker, move.new, move.reason) == ("p1", Role.DECODE, Reason.DECODE_SATURATED)


def test_prompts_waiting_at_the_prefill_workers_add_a_prefill_worker():
    """The router keeps long prompts on the prefill pool while it is under its queue limit: when they wait there
    and decode has room, the pool grows."""
    s = signals([w("p0", Role.PREFILL, queued=4000), w("d0", Role.DECODE, active=2), w("d1", Role.DECODE)],
                ttft=None, tpot=None, finished=0)  # 4 s of estimated wait: backlog even before SLO data
    move = Planner(PlannerConfig(**ON)).decide(s)
    assert (move.workers, move.new, move.reason) == (["d1"], Role.PREFILL, Reason.PREFILL_BACKLOG)


def _cluster64(queued: int) -> list[WorkerSignal]:
    return [w(f"p{i}", Role.PREFILL, queued=queued) for i in range(16)] + \
        [w(f"d{i:02d}", Role.DECODE, active=i % 3) for i in range(48)]


def test_a_large_cluster_moves_a_share_of_its_workers_at_once():
    move = Planner(PlannerConfig(**ON)).decide(signals(_cluster64(queued=1500), ttft=0.6, tpot=0.99))
    assert move.new is Role.PREFILL and len(move.workers) == 6  # 1.5 s of wait: one step, 10% of 64
    assert all(n.startswith("d") for n in move.workers)  # the least loaded decoders
    assert {n for n in move.workers} <= {f"d{i:02d}" for i in range(48) if i % 3 == 0}


@pytest.mark.parametrize("queued, moved", [(2500, 12), (3900, 18), (6000, 24), (20000, 24)])
def test_a_deeper_prefill_backlog_moves_more_workers_at_once(queued, moved):
    """k x prefill_wait_high_s of estimated wait (1,000 tokens/s per worker) moves k steps of 6, at most 4."""
    move = Planner(PlannerConfig(**ON)).decide(signals(_cluster64(queued), ttft=0.99, tpot=0.99))
    assert (move.new, move.reason, len(move.workers)) == (Role.PREFILL, Reason.PREFILL_BACKLOG, moved)


def test_ttft_misses_with_no_prompt_waiting_now_move_nothing():
    """The window's TTFT misses are history: once the prefill queue has drained, a move would overshoot."""
    planner = Planner(PlannerConfig(**ON))
    assert planner.decide(signals(_cluster64(queued=100), ttft=0.6, tpot=0.99)) is Hold.BALANCED  # 0.1 s of wait
    move = planner.decide(signals(_cluster64(queued=400), ttft=0.6, tpot=0.99))  # 0.4 s: still waiting
    assert (move.new, move.reason, len(move.workers)) == (Role.PREFILL, Reason.PREFILL_BACKLOG, 6)


def test_aggregated_and_ttft_missed_splits_off_no_prefill_worker():
    """Prompts waiting on aggregated workers wait for compute; a prefill-only worker adds none (in the simulator at
    16 aggregated workers, the first one drew every long prompt and the backlog rule then moved 13 more: goodput
    0.08 against 0.58 req/s without the planner, docs/benchmarks.md).  With a pool, the same miss grows it."""
    s = signals([w("d0", Role.DECODE, queued=3000), w("d1", Role.DECODE, queued=3000, active=1)], ttft=0.5,
                tpot=0.99)
    planner = Planner(PlannerConfig(**ON))
    assert all(planner.decide(s) is Hold.NO_SPLIT_HELPS for _ in range(5))
    pooled = signals([w("p0", Role.PREFILL, queued=3000), w("d0", Role.DECODE, queued=0),
                      w("d1", Role.DECODE, active=1)], ttft=0.5, tpot=0.99)
    move = Planner(PlannerConfig(**ON)).decide(pooled)
    assert (move.workers, move.new, move.reason) == (["d0"], Role.PREFILL, Reason.PREFILL_BACKLOG)


def test_both_short_is_saturation_not_a_move():
    s = signals([w("p0", Role.PREFILL, queued=5000), w("d0", Role.DECODE, active=8)], ttft=0.3, tpot=0.3)
    assert Planner(PlannerConfig(**ON)).decide(s) is Hold.SATURATED


@pytest.mark.parametrize("step, ttft, tpot, split", [(0.05, 0.8, 0.5, True), (0.05, 0.8, 0.85, False),
                                                     (0.05, 0.34, 0.28, False), (0.15, 0.8, 0.5, False),
                                                     (None, 0.8, 0.5, False)])
def test_both_missed_while_light_decoders_prefill_is_interference_not_saturation(step, ttft, tpot, split):
    """Aggregated workers prefilling long prompts beside their decodes miss both SLOs, TPOT the worse, while their
    decode steps alone take a quarter of the TPOT SLO: the TPOT misses are the prompts' (interference), and a split
    removes them.  Read as saturation, the agent cell at 64 simulated workers (1/4 lengths, 100 ms TPOT, 2x) held
    for 44 s and split at 62 s of 78 (19.5 req/s; 16 + 48 from the start: 27.3).  TTFT the worse met, or met for
    under `split_ttft_floor` (prefill throughput short: a split takes more of it; the conversation cell at 16
    workers split at 34% / 28% and served 0.36x), steps near the SLO (0.75 of it) or unmeasured: saturation."""
    workers = [replace(w(f"d{i}", Role.BOTH, queued=2500, active=1), decode_step_s=step) for i in range(8)]
    decision = Planner(PlannerConfig(**ON)).decide(signals(workers, ttft=ttft, tpot=tpot))
    if split:
        assert (decision.new, decision.reason, len(decision.workers)) == (Role.PREFILL,
                                                                          Reason.PREFILL_INTERFERENCE, 2)
    else:
        assert decision is Hold.SATURATED


def test_both_missed_is_saturation_while_the_pool_has_room_and_decode_headroom_past_the_low_load():
    """The rule's other bounds: a prefill pool with room (the decoders' prompts are ones the router keeps local,
    which a split would not take) is saturation; decoders busier than decode_load_low (0.5) would lose more
    capacity than isolation gains: hold as decode_headroom."""
    light = [replace(w(f"d{i}", Role.DECODE, queued=2500, active=1), decode_step_s=0.05) for i in range(8)]
    room = signals([w("p0", Role.PREFILL, queued=100), *light], ttft=0.8, tpot=0.5)
    assert Planner(PlannerConfig(**ON)).decide(room) is Hold.SATURATED
    busy = [replace(w(f"d{i}", Role.BOTH, queued=2500, active=5), decode_step_s=0.05) for i in range(8)]
    assert Planner(PlannerConfig(**ON)).decide(signals(busy, ttft=0.8, tpot=0.5)) is Hold.DECODE_HEADROOM


def test_idle_prefill_workers_go_to_decode_when_decode_is_busy():
    s = signals([w("p0", Role.PREFILL), w("p1", Role.PREFILL), w("d0", Role.DECODE, active=5),
                 w("d1", Role.DECODE, active=5)])
    move = Planner(PlannerConfig(**ON)).decide(s)
    assert (move.workers, move.new, move.reason) == (["p0"], Role.DECODE, Reason.PREFILL_IDLE)
    quiet = signals([w("p0", Role.PREFILL), w("d0", Role.DECODE, active=1)])
    assert Planner(PlannerConfig(**ON)).decide(quiet) is Hold.BALANCED


def test_only_a_measured_tpot_miss_ends_disaggregation():
    """The last prefill worker stays on load proxies (decode KV nearly full, prefill idle) while TPOT is met, and
    leaves when TPOT is missed; a large move keeps one prefill worker unless TPOT is missed."""
    full = [w("p0", Role.PREFILL, queued=100), w("d0", Role.DECODE, active=7)]  # decode load 0.875 > 0.85
    assert Planner(PlannerConfig(**ON)).decide(signals(full, tpot=0.95)) is Hold.LAST_PREFILL
    idle = [w("p0", Role.PREFILL), w("d0", Role.DECODE, active=5)]
    assert Planner(PlannerConfig(**ON)).decide(signals(idle)) is Hold.LAST_PREFILL
    move = Planner(PlannerConfig(**ON)).decide(signals(full, tpot=0.6))
    assert (move.workers, move.new, move.reason) == (["p0"], Role.DECODE, Reason.DECODE_SATURATED)
    many = [w(f"p{i}", Role.PREFILL) for i in range(3)] + [w(f"d{i}", Role.DECODE, active=7) for i in range(27)]
    move = Planner(PlannerConfig(**ON)).decide(signals(many))  # 10% of 30 = 3, the whole prefill pool
    assert move.new is Role.DECODE and move.workers == ["p0", "p1"]


def test_the_last_decoder_never_leaves_decode():
    s = signals([w("p0", Role.PREFILL, queued=LIMIT), w("d0", Role.DECODE, queued=900, active=0)], ttft=1.0,
                tpot=0.2)
    assert Planner(PlannerConfig(**ON)).decide(s) is Hold.NO_CANDIDATE
    # (and a full one would not leave anyway: interference splits only from decode load under decode_load_low)
    full = signals([w("p0", Role.PREFILL, queued=LIMIT), w("d0", Role.DECODE, queued=900, active=8)], ttft=1.0,
                   tpot=0.2)
    assert Planner(PlannerConfig(**ON)).decide(full) is Hold.DECODE_HEADROOM


def test_cooldown_and_dwell_after_a_move():
    planner = Planner(PlannerConfig(**ON))
    workers = [w("p0", Role.PREFILL, queued=LIMIT), w("d0", Role.DECODE, queued=500),
               w("d1", Role.DECODE, queued=500, active=2)]
    move = planner.decide(signals(workers, tpot=0.5, now=100))
    assert move.worker == "d0"
    planner.applied(move, 100)
    assert planner.decide(signals(workers, tpot=0.5, now=105)) is Hold.COOLDOWN
    # past the cooldown decode is full: a prefill worker goes back to decode, but not d0 within its dwell time
    workers = [w("p0", Role.PREFILL), w("d0", Role.PREFILL), w("d1", Role.DECODE, active=8)]
    back = planner.decide(signals(workers, tpot=0.5, now=111))
    assert isinstance(back, Move) and back.worker == "p0"  # d0 must dwell 20 s


def _flipping_run(cfg: PlannerConfig, period_rounds: int, rounds: int = 900):
    """Signals that flip between prefill-hungry and decode-hungry every `period_rounds` rounds of 2 s."""
    planner = Planner(cfg)
    roles = {"a": Role.PREFILL, "b": Role.DECODE, "c": Role.DECODE}
    moves = []
    for i in range(rounds):
        now = 100.0 + 2 * i
        # phase A: TPOT suffers from prompts prefilled on decode workers, the prefill pool full (wants a prefill
        # worker); phase B: TPOT suffers because decode is full, nothing prefills there (wants a decode worker)
        phase_a = (i // period_rounds) % 2 == 0
        workers = [w(n, r, queued=(600 if r.decodes else LIMIT) if phase_a else 0, active=2 if phase_a else 8)
                   for n, r in roles.items()]
        decision = planner.decide(signals(workers, ttft=1.0, tpot=0.5, now=now))
        if isinstance(decision, Move):
            planner.applied(decision, now)
            roles[decision.worker] = decision.new
            moves.append((now, decision))
    return planner, moves


def test_signals_flipping_every_round_move_nothing():
    _, moves = _flipping_run(PlannerConfig(**{**ON, "confirm_rounds": 3}), period_rounds=1)
    assert moves == []


@pytest.mark.parametrize("period_rounds", [3, 10, 60])
def test_hysteresis_bound_at_most_one_reversal_per_worker_per_window(period_rounds):
    """Load that swings back and forth for 30 simulated minutes: moves are at least a cooldown apart and no
    worker reverses twice within the reversal window."""
    cfg = PlannerConfig(**{**ON, "confirm_rounds": 3})
    planner, moves = _flipping_run(cfg, period_rounds)
    assert moves, "swinging load must still move workers"
    times = [t for t, _ in moves]
    assert all(b - a >= cfg.cooldown_s for a, b in zip(times, times[1:]))
    for name, history in planner.history.items():
        reversals = list(history.reversals)
        assert all(b - a >= cfg.reversal_window_s for a, b in zip(reversals, reversals[1:])), name
    # and in any window, per worker: at most one reversal (checked on the full move list)
    for name in ("a", "b", "c"):
        mine = [(t, m) for t, m in moves if m.worker == name]
        rev = [t for (t0, m0), (t, m) in zip(mine, mine[1:]) if m.new is m0.old]
        assert all(b - a >= cfg.reversal_window_s for a, b in zip(rev, rev[1:])), (name, rev)


def test_a_move_needs_confirmation_rounds():
    planner = Planner(PlannerConfig(**{**ON, "confirm_rounds": 3}))
    workers = [w("p0", Role.PREFILL, queued=3000), w("d0", Role.DECODE), w("d1", Role.DECODE)]
    assert planner.decide(signals(workers, ttft=0.5, now=100)) is Hold.CONFIRMING
    assert planner.decide(signals(workers, ttft=0.5, now=102)) is Hold.CONFIRMING
    move = planner.decide(signals(workers, ttft=0.5, now=104))
    assert isinstance(move, Move) and move.reason is Reason.PREFILL_BACKLOG and move.new is Role.PREFILL


def test_latency_window_attainment():
    window = LatencyWindow()
    window.record(0.0, 0.5, 2.5, 21)  # TTFT 0.5 s, TPOT 0.1 s
    window.record(0.0, 3.0, 3.0, 1)  # TTFT 3 s, no TPOT (one token)
    window.record(5.0, 5.2, 9.2, 11)  # TTFT 0.2 s, TPOT 0.4 s
    ttft, tpot, n = window.attainment(ttft_s=1.0, tpot_s=0.2, window_s=100, now=10)
    assert (ttft, tpot, n) == (pytest.approx(2 / 3), 0.5, 3)
    assert window.attainment(1.0, 0.2, window_s=2, now=10) == (1.0, 0.0, 1)  # only the last one is recent
    assert window.attainment(1.0, 0.2, window_s=1, now=100) == (None, None, 0)


def test_the_loop_carries_out_every_worker_of_a_move():
    """A move of several workers (a large cluster's step) changes all of them, not only the first: the router's
    routing sets, health roles and the planner's metrics follow for each one."""
    import asyncio

    from disagg.planner.loop import PlannerLoop
    from disagg.router.planner_port import RouterPlannerPort
    from disagg.router.router import RouterCore

    core = RouterCore({}, dict.fromkeys(["d0", "d1", "d2", "d3"]))
    loop = PlannerLoop(RouterPlannerPort.of(core), PlannerConfig(enabled=True))
    move = Move(["d1", "d3"], Role.BOTH, Role.PREFILL, Reason.PREFILL_BACKLOG, "test")
    loop.planner.decide = lambda signals: move  # the decision is tested above; here only its execution
    assert asyncio.run(loop.step()) is move
    assert sorted(core.prefill) == ["d1", "d3"] and sorted(core.decode) == ["d0", "d2"]
    assert {n: core.health.workers[n].role for n in core.handles} == {
        "d0": Role.BOTH, "d1": Role.PREFILL, "d2": Role.BOTH, "d3": Role.PREFILL
    }
    assert [r.worker for r in core.roles.records] == ["d1", "d3"]
    assert all(r.detail == "test" and r.reason == "prefill_backlog" for r in core.roles.records)
    assert loop.moves == {(Role.BOTH, Role.PREFILL, Reason.PREFILL_BACKLOG): 2}
    assert all(type(k) is Role for k in next(iter(loop.moves))[:2])  # kept by enum; /metrics writes the values
    assert loop.status()["moves"] == [{"from": "both", "to": "prefill", "reason": "prefill_backlog", "count": 2}]


@pytest.mark.parametrize("active, moved", [(50, 19), (84, 0)])
def test_a_backlog_move_leaves_the_decode_workers_below_their_high_water_mark(active, moved):
    """The router fills the prefill pool to its queue limit whenever prompts outrun it, so the backlog alone never
    says stop: decode workers at load L leave only while the rest stay under decode_load_high (0.85)."""
    workers = [w(f"p{i}", Role.PREFILL, queued=6000) for i in range(16)] + \
        [w(f"d{i:02d}", Role.DECODE, active=active, max_running=100) for i in range(48)]
    decision = Planner(PlannerConfig(**ON)).decide(signals(workers, ttft=0.99, tpot=0.99))
    if moved:  # load 0.5: int(48 x (1 - 0.5 / 0.85)) = 19 of the 24 the 6 s backlog asks for
        assert (decision.new, decision.reason, len(decision.workers)) == (Role.PREFILL, Reason.PREFILL_BACKLOG, moved)
        assert 0.5 * 48 / (48 - moved) <= 0.85
    else:  # load 0.84: one worker fewer would put the other 47 past 0.85
        assert decision is Hold.DECODE_HEADROOM


def test_the_port_reads_each_workers_decode_step_from_its_measured_model_only():
    """The signals carry a worker's predicted decode step from the step model its heartbeats carry; a worker
    without one reads None (never the prior's guess: the planner then judges TPOT misses as before)."""
    from disagg.engine.step_time import StepCoefficients
    from disagg.router.placement import WorkerTiming
    from disagg.router.planner_port import RouterPlannerPort
    from disagg.router.router import RouterCore

    core = RouterCore({}, dict.fromkeys(["d0", "d1"]))
    core.loads["d0"].timing = WorkerTiming(model=StepCoefficients(0.01, 0.0001, 0.002, 0.00001))
    core.loads["d0"].decoding = core.loads["d0"].active_requests = 3
    core.loads["d0"].active_blocks = 30  # 480 tokens (16 a block): 160 a stream
    by_name = {s.name: s for s in RouterPlannerPort.of(core).signals(PlannerConfig(enabled=True), 100.0).workers}
    # one more sequence, the context unchanged; a stream more brings a stream's mean context
    assert by_name["d0"].decode_step_s == pytest.approx(0.01 + 4 * 0.0001 + 4 * 0.002 + 0.00001 * 0.48)
    assert by_name["d0"].decode_seq_s == pytest.approx(0.0001 + 0.002 + 0.00001 * 0.16)
    assert by_name["d1"].decode_step_s is None and by_name["d1"].decode_seq_s is None
