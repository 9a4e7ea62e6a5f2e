"""The simulator side of issue 14: role changes and the planner in virtual time (nothing lost, roles follow),
the fidelity knobs (event jitter makes the router pull snapshots, KV reads share a link, shared cores slow steps),
`disagg plan` ranking, and the load-step harness."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.planner_step import _reversals, recovery_s, step_workload
from disagg.protocol import Request, Role
from disagg.router.admission import AdmissionConfig
from disagg.sim.cluster import SimCluster, SimClusterConfig, sampling_for
from disagg.sim.run import simulate
from disagg.sim.spec import ClusterSpec
from disagg.sim.timemodel import StepTimeModel
from disagg.workload import agent
from disagg.workload.metrics import SLO
from disagg.workload.record import TraceScale

REPO = Path(__file__).resolve().parents[1]
MODEL = StepTimeModel()
SCALE = TraceScale(block_tokens=16, max_input_tokens=1791, max_output_tokens=256)


def _trace(sessions=30, rate=1.0):
    return agent.generate(agent.parse_mix("coding_agent:2,short_chat:1"), sessions, rate, seed=0)


def test_role_change_mid_run_loses_nothing_and_routing_follows():
    cluster = SimCluster(SimClusterConfig(num_prefill=1, num_decode=2, num_blocks=512), MODEL)
    done: dict[str, int] = {}

    def submit(i: int) -> None:
        prompt = [(7 * i + j) % 4000 + 1 for j in range(300)]
        cluster.submit(Request(f"r{i}", prompt, sampling_for(20)),
                       lambda now, d, i=i: done.__setitem__(f"r{i}", done.get(f"r{i}", 0) + len(d.token_ids)))

    for i in range(6):
        cluster.loop.at(0.01 * i, lambda i=i: submit(i))
    cluster.loop.at(0.2, lambda: cluster.set_role("prefill-0", Role.DECODE))  # mid-flight
    for i in range(6, 12):
        cluster.loop.at(0.3 + 0.01 * i, lambda i=i: submit(i))
    cluster.run()
    assert done == {f"r{i}": 20 for i in range(12)}
    assert cluster.prefill == {} and set(cluster.decode) == {"prefill-0", "decode-0", "decode-1"}
    assert cluster.router.health.workers["prefill-0"].role is Role.DECODE
    assert all(load.active_requests == 0 and load.queued_prefill_tokens == 0 for load in cluster.router.loads.values())


def test_planner_in_simulation_moves_and_never_reverses_twice_in_its_window():
    spec = ClusterSpec("dyn", 2, 6, "kv", planner=True)
    config = SimClusterConfig(num_prefill=2, num_decode=6, num_blocks=364, planner=spec.planner_config(SLO(2000, 200)))
    scale = TraceScale(**{**SCALE.__dict__, "time_scale": 3.0})
    result = simulate(_trace(40), scale, config, MODEL)
    assert all(r.ok for r in result.records)
    changes = result.counters["role_changes"]
    assert changes, "a 2P:6D split at 3x this load is prefill-queue bound: the planner must move"
    assert all(c["reason"] in ("prefill_backlog", "prefill_idle", "decode_saturated", "prefill_interference")
               for c in changes)
    times = sorted({c["time_s"] for c in changes})  # one move may carry several workers (a deep backlog)
    assert all(b - a >= 10 for a, b in zip(times, times[1:]))  # the cooldown between moves
    assert max(_reversals(changes).values(), default=0) <= 1  # well inside a 120 s window for this short run
    assert sum(result.counters["final_split"]) == 8


def test_a_simulation_is_reproducible():
    """Same trace, same config: the same result, in this process and (the router's tie-breaks are seeded) in any
    other; an unseeded policy once made the first request's worker, and everything after it, differ by run."""
    trace = _trace(20)
    runs = [simulate(trace, SCALE, SimClusterConfig(num_prefill=0, num_decode=4, num_blocks=364), MODEL)
            for _ in range(3)]
    assert len({tuple((r.ttft_s, r.e2e_s, r.cached_tokens) for r in run.records) for run in runs}) == 1


def test_event_jitter_reorders_batches_and_the_router_pulls_snapshots():
    trace = _trace(20)
    calm = simulate(trace, SCALE, SimClusterConfig(num_prefill=0, num_decode=4, num_blocks=364), MODEL)
    jitter = simulate(trace, SCALE, SimClusterConfig(num_prefill=0, num_decode=4, num_blocks=364,
                                                     event_jitter_s=0.05, snapshot_delay_s=0.05), MODEL)
    assert calm.counters.get("snapshots", 0) == 0
    assert jitter.counters["snapshots"] > 0
    assert all(r.ok for r in jitter.records)


def test_shared_cores_slow_steps_down():
    trace = _trace(30)
    busy = TraceScale(**{**SCALE.__dict__, "time_scale": 4.0})
    base = dict(num_prefill=1, num_decode=3, num_blocks=364)
    mean = lambda res: sum(r.e2e_s for r in res.records) / len(res.records)  # noqa: E731
    alone = simulate(trace, busy, SimClusterConfig(**base), MODEL)
    shared = simulate(trace, busy, SimClusterConfig(**base, cores=1), MODEL)
    assert mean(shared) > mean(alone) * 1.3  # 4 workers on 1 core: steps stretch when they run together
    cluster = SimCluster(SimClusterConfig(**base, cores=2), MODEL)
    assert cluster.contention() == 1.0  # a step starting alone (1 of 2 cores)
    for w in cluster.workers[:3]:
        cluster.steps.start(w, 1.0, 4, lambda duration: None)
    assert cluster.contention() == 2.0  # 4 single-thread workers running on 2 cores


def test_shared_cores_price_a_step_over_its_whole_span():
    """Processor sharing: a long step that starts alone slows down when others start beside it, and speeds up
    again when they end; a killed worker's step stops taking a core.  (Fixing a step's duration at its start
    priced the long step at 1x and charged the short ones all of the contention.)"""
    from disagg.sim.cores import CoresConfig, SharedCores, SharedSteps
    from disagg.sim.worker import EventLoop

    loop = EventLoop()
    steps = SharedSteps(SharedCores(CoresConfig(cores=1)), lambda: loop.now, loop.at)
    done: dict[str, float] = {}
    finish = lambda name: lambda duration: done.setdefault(name, duration)  # noqa: E731
    steps.start("long", 1.0, 512, finish("long"))  # 1 s of work alone on the one core
    loop.at(0.5, lambda: steps.start("short", 0.25, 4, finish("short")))  # two share it from 0.5 s: half each
    loop.run()
    assert done["short"] == pytest.approx(0.5)  # 0.25 s of work at half a core
    assert done["long"] == pytest.approx(1.25)  # 0.5 alone + 0.25 of work in 0.5 shared + 0.25 alone again

    done.clear()
    steps.start("long", 1.0, 512, finish("long"))
    steps.start("killed", 1.0, 4, finish("killed"))
    loop.at(loop.now + 0.5, lambda: steps.cancel("killed"))  # half a core each until then
    loop.run()
    assert "killed" not in done
    assert done["long"] == pytest.approx(0.5 + 0.75)  # 0.25 of work in the first 0.5 s, then the core alone


def test_a_stale_end_event_never_ends_the_next_step_of_the_same_worker():
    """A step that sped up mid-way (its first end event is stale) or was cancelled (its end event still queued)
    leaves an event behind; the same worker's next step must run its full length regardless."""
    from disagg.sim.cores import CoresConfig, SharedCores, SharedSteps
    from disagg.sim.worker import EventLoop

    loop = EventLoop()
    steps = SharedSteps(SharedCores(CoresConfig(cores=1)), lambda: loop.now, loop.at)
    durations: list[float] = []

    def back_to_back(duration: float) -> None:  # a busy worker: its next step starts as one ends
        durations.append(duration)
        if len(durations) < 3:
            steps.start("w", 1.0, 4, back_to_back)

    steps.start("v", 0.1, 4, lambda duration: None)  # shares the core for the first 0.2 s
    steps.start("w", 1.0, 4, back_to_back)  # its end is first scheduled at 2.0, then at 1.1 once v is done
    loop.run()
    assert durations == pytest.approx([1.1, 1.0, 1.0])

    durations.clear()
    steps.start("w", 2.0, 4, lambda duration: durations.append(duration))  # its end event: 2 s from now
    steps.cancel("w")  # killed at once; restarted, it runs a step of 3 s
    steps.start("w", 3.0, 4, lambda duration: durations.append(duration))
    loop.run()
    assert durations == pytest.approx([3.0])


def test_measured_machine_costs_co_run_and_serving_cpu():
    """The shared-core model with what bench/sim/machine.py measures: a step pays the co-run factor only while
    another worker computes, and the serving processes' CPU (per request, per streamed token, as a rate over the
    last window) takes cores from the engines."""
    from disagg.sim.cores import CoresConfig, SharedCores

    cores = SharedCores(CoresConfig(cores=2, corun_slowdown=1.5, cpu_per_request_s=0.01, cpu_per_token_s=0.002))
    assert cores.slowdown(1, now=0.0) == 1.0  # alone, nothing served yet
    assert cores.slowdown(2, now=0.0) == 1.5  # two engines on two cores: co-run only
    for i in range(100):  # 100 requests x 200 tokens within one second: 1 + 40 CPU seconds per second
        cores.on_request(i / 100)
        cores.on_tokens(i / 100, 200)
    assert cores.serving_cores(0.99) == pytest.approx(41.0)
    assert cores.slowdown(2, now=0.99) == pytest.approx((2 + 41.0) / 2 * 1.5)
    assert cores.serving_cores(2.5) == 0.0  # the window moved past them
    assert SharedCores(CoresConfig(cores=0, corun_slowdown=3.0)).slowdown(4, now=0.0) == 1.0  # nothing shared
    assert SharedCores(CoresConfig(cores=2, idle_serving_cores=0.5)).slowdown(2, now=0.0) == 1.25  # Ray's daemons

    trace = _trace(30)
    busy = TraceScale(**{**SCALE.__dict__, "time_scale": 4.0})
    base = dict(num_prefill=0, num_decode=2, num_blocks=364, cores=2)
    mean = lambda res: sum(r.e2e_s for r in res.records) / len(res.records)  # noqa: E731
    plain = simulate(trace, busy, SimClusterConfig(**base), MODEL)
    loaded = simulate(trace, busy, SimClusterConfig(**base, corun_slowdown=1.5, serving_cpu_per_token_s=0.005), MODEL)
    assert mean(loaded) > mean(plain) * 1.1  # (a step pays co-run only while the other computes: 1.12 here)



def test_co_run_factor_follows_the_step_size():
    """A decode step (a few tokens, every weight read) pays its size class's co-run factor, a prefill chunk its
    own, a step beyond every class the overall one; alone, none of them pays.  In a cluster, decode steps that
    run beside prefill steps come out slower than with the overall factor."""
    from disagg.sim.cores import CoresConfig, SharedCores

    by_size = ((16, 1.8), (512, 1.1))
    cores = SharedCores(CoresConfig(cores=2, corun_slowdown=1.3, corun_by_tokens=by_size))
    assert cores.slowdown(2, now=0.0, tokens=4) == 1.8
    assert cores.slowdown(2, now=0.0, tokens=16) == 1.8
    assert cores.slowdown(2, now=0.0, tokens=300) == 1.1
    assert cores.slowdown(2, now=0.0, tokens=2048) == 1.3
    assert cores.slowdown(1, now=0.0, tokens=4) == 1.0
    # measured oversubscription: 3 busy of 4 workers on 2 cores pay 2.2x (more than the cores' share, 1.5)
    busy = SharedCores(CoresConfig(cores=2, corun_slowdown=1.3, busy_factors=((1, 1.0), (2, 2.2))))
    assert busy.slowdown(2, now=0.0) == pytest.approx(1.3)
    assert busy.slowdown(3, now=0.0) == pytest.approx(2.2 * 1.3)
    assert busy.slowdown(5, now=0.0) == pytest.approx(2.5 * 1.3)  # beyond the measured: the cores' share

    trace = _trace(30)
    busy = TraceScale(**{**SCALE.__dict__, "time_scale": 4.0})
    base = dict(num_prefill=1, num_decode=1, num_blocks=364, cores=2, corun_slowdown=1.1)
    tpot = lambda res: statistics.median(r.tpot_s for r in res.records if r.tpot_s)  # noqa: E731
    ttft = lambda res: statistics.median(r.ttft_s for r in res.records)  # noqa: E731
    flat = simulate(trace, busy, SimClusterConfig(**base), MODEL)
    sized = simulate(trace, busy, SimClusterConfig(**base, corun_by_tokens=((16, 1.8),)), MODEL)
    slow = simulate(trace, busy, SimClusterConfig(**{**base, "corun_slowdown": 1.8}), MODEL)
    assert tpot(sized) > tpot(flat) * 1.1  # decode steps pay 1.8 ...
    assert ttft(sized) < ttft(slow) * 0.9  # ... prefill steps only 1.1


def _first_tokens(link_contention: bool) -> list[float]:
    """Two long prompts prefilled together on one prefill worker, both read into the one decode worker."""
    # steps cost ~1 ms, a read of 15 blocks ~0.11 s: the reads decide when the first tokens come out
    slow_link = StepTimeModel(base=0.001, per_token=1e-6, per_seq=0.0, per_attn=0.0, transfer_latency=0.0,
                              transfer_bandwidth=1e8)
    cluster = SimCluster(SimClusterConfig(num_prefill=1, num_decode=1, num_blocks=512,
                                          link_contention=link_contention), slow_link)
    firsts: dict[str, float] = {}
    for i in range(2):
        prompt = [(13 * i + j) % 4000 + 1 for j in range(241)]  # 15 full blocks
        cluster.submit(Request(f"r{i}", prompt, sampling_for(4)),
                       lambda now, d, i=i: firsts.setdefault(f"r{i}", now))
    cluster.run()
    return sorted(firsts.values())


def test_kv_reads_into_one_worker_share_its_link():
    shared, free = _first_tokens(True), _first_tokens(False)
    read = 15 * StepTimeModel().bytes_per_block / 1e8
    assert free[1] - free[0] < read / 2  # both reads at once: the two first tokens come together
    assert shared[1] - shared[0] == pytest.approx(read, rel=0.2)  # the second read waits for the first


def test_disagg_plan_ranks_splits_and_says_why(tmp_path):
    out = subprocess.run([sys.executable, "-m", "disagg.cli", "plan", "--agent", "coding_agent", "--sessions", "12",
                          "--session-rate", "0.5", "--workers", "4", "--dynamic", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    configs = [r["config"] for r in plan["ranking"]]
    assert {"agg-kv 0x4", "disagg 1x3", "disagg 2x2", "disagg 3x1"} <= set(configs)
    assert any(c.startswith("dynamic from") for c in configs)
    goodputs = [r["goodput"] for r in plan["ranking"]]
    assert goodputs == sorted(goodputs, reverse=True)
    assert plan["reason"].startswith(f"{configs[0]} wins") or f"{configs[0]} is listed first" in plan["reason"]
    assert "| rank | config |" in out.stdout


def test_step_workload_and_recovery_measure():
    trace = step_workload("short_chat", rate=1.0, phase_s=20, factor=2.0)
    first = [r for r in trace if r.timestamp_ms < 20_000 and not r.session_id.startswith("b")]
    second = [r for r in trace if r.session_id.startswith("b")]
    assert second and first and min(r.timestamp_ms for r in second) >= 20_000
    # the second phase's private blocks never collide with the first's
    private = lambda rs: {h for r in rs for h in r.hash_ids if h >= 2_000_000_000}  # noqa: E731
    assert not private(first) & private(second)
    series = [{"t": t, "attainment": a} for t, a in [(0, 1.0), (10, 0.5), (20, 0.8), (30, 0.95), (40, 0.93)]]
    assert recovery_s(series, step_s=10, target=0.9) == 20
    assert recovery_s(series[:3], step_s=10, target=0.9) is None


def test_simulated_workers_heartbeat_their_kv_size_and_the_router_queues_for_kv_room():
    """As a real worker's heartbeat does, a simulated worker tells the router its KV size, so the router's
    KV-room check (max_kv_fraction of the blocks) binds and the admission queue holds what does not fit; with no
    heartbeat the router would dispatch all four at once."""
    cluster = SimCluster(SimClusterConfig(num_prefill=0, num_decode=1, num_blocks=64, max_model_len=1024,
                                          admission=AdmissionConfig()), MODEL)
    assert cluster.router.health.workers["decode-0"].stats.kv_blocks_total == 64
    in_flight: list[int] = []
    done: dict[str, int] = {}

    def on_token(now, d, i):
        in_flight.append(cluster.router.loads["decode-0"].active_requests)
        done[f"r{i}"] = done.get(f"r{i}", 0) + len(d.token_ids)

    for i in range(4):  # 25 blocks each: two fit under 0.9 x 64 blocks, a third does not
        prompt = [(11 * i + j) % 4000 + 1 for j in range(400)]
        cluster.submit(Request(f"r{i}", prompt, sampling_for(8)), lambda now, d, i=i: on_token(now, d, i))
    cluster.run()
    assert done == {f"r{i}": 8 for i in range(4)}
    assert max(in_flight) == 2


def test_handoff_cost_delays_a_remote_first_token_and_charges_serving_cpu():
    def first_token(**extra) -> tuple[float, float]:
        cluster = SimCluster(SimClusterConfig(num_prefill=1, num_decode=1, num_blocks=512, cores=2, **extra), MODEL)
        first: list[float] = []
        prompt = [(5 * j) % 4000 + 1 for j in range(300)]  # above min_remote_prefill_tokens: prefilled remotely
        cluster.submit(Request("r", prompt, sampling_for(2)), lambda now, d: first.append(now))
        cluster.run()
        assert cluster.counters["remote_prefills"] == 1
        return first[0], cluster.cores._sum

    plain, plain_cpu = first_token()
    slow, slow_cpu = first_token(handoff_overhead_s=0.05, serving_cpu_per_handoff_s=0.004)
    assert slow - plain == pytest.approx(0.05, abs=1e-6)
    assert slow_cpu - plain_cpu == pytest.approx(0.004)


def test_an_engine_on_shared_cores_measures_its_steps_as_they_ran():
    """Two prompts prefilled at once on one shared core each take twice their time alone, and each engine's
    measured prefill speed (what its heartbeats tell the router) says so - also the engine whose step started
    first, alone (pricing a step by its start would have it measure its time alone)."""
    cluster = SimCluster(SimClusterConfig(num_prefill=0, num_decode=2, num_blocks=512, cores=1), MODEL)
    for i in range(2):
        prompt = [(31 * i + j) % 4000 + 1 for j in range(256)]
        cluster.submit(Request(f"r{i}", prompt, sampling_for(1)), lambda now, d: None)
    cluster.run()
    engines = [w.engine for w in cluster.workers]
    assert [e.stats.steps for e in engines] == [1, 1]  # one prefill step each, side by side
    alone = MODEL.predict([1.0, 256, 1.0, 256 * 257 / 2 / 1000]) / 256
    for w in cluster.workers:
        assert w.engine.prefill_s_per_token == pytest.approx(w.busy_seconds / 256)
        assert w.engine.prefill_s_per_token == pytest.approx(2 * alone, rel=0.02)
