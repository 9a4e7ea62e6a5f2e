"""Simulated workers: time-model fit, the virtual-time cluster's bookkeeping (real pools, schedulers, KV events,
handoff), the real router driven at scale, and calibration against a real (tiny) engine."""
import json
import time

import numpy as np
import pytest

from bench.sim import calibrate
from disagg.engine.step_time import nnls
from disagg.protocol import Request
from disagg.router.policy import PolicyConfig, PolicyKind
from disagg.sim.cluster import SimCluster, SimClusterConfig, sampling_for
from disagg.sim.run import simulate
from disagg.sim.timemodel import StepTimeModel
from disagg.workload import agent, loaders
from disagg.workload.record import TraceScale

MODEL = StepTimeModel(base=0.01, per_token=0.001, per_seq=0.002, per_attn=0.0, transfer_latency=0.005,
                      transfer_bandwidth=1e9, bytes_per_block=1_000_000)
SEEDED_KV = PolicyConfig(kind=PolicyKind.KV, seed=0)


def test_nnls_recovers_known_coefficients_and_stays_non_negative():
    rng = np.random.default_rng(0)
    a = np.column_stack([np.ones(200), rng.uniform(0, 500, 200), rng.uniform(1, 32, 200), rng.uniform(0, 50, 200)])
    truth = np.array([0.02, 0.003, 0.001, 0.0])
    b = a @ truth + rng.normal(0, 1e-4, 200)
    assert np.allclose(nnls(a, b), truth, atol=2e-4)
    assert (nnls(a, -b) >= 0).all()
    model = StepTimeModel.fit(a.tolist(), b.tolist())
    assert model.per_token == pytest.approx(0.003, rel=0.05)


def _finish(cluster, requests):
    done = {}
    for rid, prompt, n in requests:
        times = []
        cluster.submit(Request(rid, prompt, sampling_for(n)), lambda t, d, times=times: times.append((t, d)))
        done[rid] = times
    cluster.run()
    return done


def test_aggregated_worker_times_follow_the_model():
    cluster = SimCluster(SimClusterConfig(num_decode=1, num_blocks=64, max_model_len=1024), MODEL)
    done = _finish(cluster, [("a", list(range(300, 400)), 5)])
    times = [t for t, _ in done["a"]]
    assert len(times) == 5 and done["a"][-1][1].finish_reason == "length"
    assert times[0] == pytest.approx(0.01 + 100 * 0.001 + 0.002)  # one prefill step of 100 tokens
    assert np.diff(times) == pytest.approx([0.01 + 0.001 + 0.002] * 4)  # decode steps of one sequence
    engine = cluster.decode["decode-0"].engine
    assert engine.pool.num_free_blocks == 64 and not engine.seqs  # every block returned


def test_disaggregated_handoff_moves_only_missing_blocks_and_releases_leases():
    cluster = SimCluster(SimClusterConfig(num_prefill=1, num_decode=1, num_blocks=64, max_model_len=1024,
                                          policy=PolicyConfig(min_remote_prefill_tokens=16)), MODEL)
    prompt = list(range(300, 396))  # 6 blocks
    done = _finish(cluster, [("a", prompt, 3)])
    assert cluster.counters == {"remote_prefills": 1, "transferred_blocks": 6}
    first = done["a"][0][0]
    assert first == pytest.approx(0.01 + 96 * 0.001 + 0.002 + 0.005 + 6 * 1e-3)  # prefill step + transfer
    # the same prefix again: the decode worker holds 5 full blocks (the last token is recomputed) -> 1 moves
    done = _finish(cluster, [("b", prompt + [7] * 32, 2)])
    assert cluster.counters["transferred_blocks"] == 6 + (8 - 6)
    for w in cluster.workers:
        assert w.engine.pool.num_free_blocks == 64 and not w.engine.connector.leases.leases


def test_kv_events_drive_the_real_router_to_the_holder():
    cluster = SimCluster(SimClusterConfig(num_decode=4, num_blocks=256, policy=SEEDED_KV), MODEL)
    prefix = list(range(1000, 1160))
    _finish(cluster, [("warm", prefix + [1], 2)])
    holder = cluster.router.decision_of("warm").decode_worker
    for i in range(6):
        _finish(cluster, [(f"q{i}", prefix + [2 + i] * 3, 2)])
        assert cluster.router.decision_of(f"q{i}").decode_worker == holder
    assert cluster.prefix_cache()["hit_ratio"] > 0.8
    # the router predicted every hit exactly (10 cached blocks of each 163-token prompt; nothing for the first)
    assert cluster.staleness == [0] * 7 and cluster.staleness_summary()["exact"] == 1.0


def test_agent_workload_kv_routing_beats_round_robin_on_hits_at_16_workers():
    trace = agent.generate({"coding_agent": 1}, 40, 2.0, seed=0)
    scale = TraceScale(block_tokens=16, max_output_tokens=16)
    hits = {}
    for policy in ("kv", "round_robin"):
        cfg = SimClusterConfig(num_decode=16, num_blocks=512, policy=PolicyConfig(kind=PolicyKind(policy), seed=0))
        result = simulate(trace, scale, cfg, MODEL)
        assert all(r.ok for r in result.records) and len(result.records) == len(trace)
        hits[policy] = result.prefix_cache["hit_ratio"]
    assert hits["kv"] > hits["round_robin"] + 0.1


def test_full_scale_replay_is_bounded_and_complete():
    trace = loaders.load("mooncake_conversation_trace.jsonl", 3000)
    t0 = time.perf_counter()
    cfg = SimClusterConfig(num_prefill=16, num_decode=48, num_blocks=1024, policy=PolicyConfig(kind=PolicyKind.KV))
    result = simulate(trace, TraceScale(block_tokens=16, max_output_tokens=32), cfg, MODEL)
    assert time.perf_counter() - t0 < 120
    assert len(result.records) == 3000 and all(r.ok for r in result.records)
    assert result.counters["workers"] == 64 and result.counters["remote_prefills"] > 0
    # sessions on the router index are real: every worker's blocks are indexed
    assert result.prefix_cache["hit_ratio"] > 0.2


def test_calibration_fits_and_validates_against_a_real_engine(tmp_path, tiny_llama_dir):
    out = tmp_path / "tm.json"
    shares = []
    for _ in range(3):  # a fit and a check are comparable only if the process got the same share of a core in both
        assert calibrate.main(["--model", str(tiny_llama_dir), "--max-model-len", "1024", "--kv-cache-mb", "16",
                               "--validate", "8", "--time-scale", "5", "--out", str(out)]) == 0
        report = json.loads((tmp_path / "tm_report.json").read_text())
        share = report["thread_share"]  # this thread's: another thread holding the GIL slows it too
        shares.append(share)
        if abs(share["check"] - share["fit"]) <= 0.1 * share["fit"]:
            break
    else:
        pytest.fail(f"another process or thread took this thread's core during every calibration: {shares}")
    model = StepTimeModel.load(out)
    assert model.per_token > 0 and model.base >= 0 and "fitted on" in model.source
    ratio = {row["metric"]: row["sim / real"] for row in report["validation"]}
    # what the fitted model achieves here (measured 1.00-1.13 for the makespan, 0.93-1.08 for TTFT p50 and E2E
    # p50), with room for a noisy shared CPU
    assert 0.7 < ratio["makespan (ms)"] < 1.4
    assert 0.6 < ratio["e2e p50 (ms)"] < 1.6


def test_simulated_kills_migrate_requests_and_every_request_completes():
    from disagg.sim.faults import SimChaos, window_goodput
    from disagg.workload.metrics import SLO

    trace = agent.generate({"coding_agent": 1}, 30, 4.0, seed=1)
    scale = TraceScale(block_tokens=16, max_output_tokens=32)
    cfg = SimClusterConfig(num_prefill=2, num_decode=6, num_blocks=512, policy=SEEDED_KV)
    chaos = SimChaos(kill_fraction=0.25, at_s=5.0, detect_s=1.3, restart_s=8.5, seed=2)
    result = simulate(trace, scale, cfg, MODEL, chaos=chaos)
    assert len(result.counters["killed"]) == 2 and result.counters["migrations"] > 0
    assert all(r.ok and r.output_tokens == r.max_tokens for r in result.records)  # nothing lost, nothing short
    windows = window_goodput(result.records, chaos, SLO(1e9, 1e9), result.duration_s)
    assert sum(w["requests"] for w in windows.values()) == len(trace)


def test_simulated_tiers_and_pins_serve_agent_turns_from_cpu():
    from bench.session_hits import next_turn_hits

    trace = agent.generate({"coding_agent": 1}, 12, 2.0, seed=3)
    scale = TraceScale(block_tokens=16, max_input_tokens=900, max_output_tokens=16)
    results = {}
    for name, tiers in (("device", 0), ("tiers", 2048)):
        cfg = SimClusterConfig(num_decode=2, num_blocks=64, max_model_len=1024, policy=SEEDED_KV,
                               cpu_tier_blocks=tiers, disk_tier_blocks=0, session_hints=bool(tiers))
        result = simulate(trace, scale, cfg, MODEL)
        assert all(r.ok for r in result.records)
        results[name] = result
    hits = {k: next_turn_hits(trace, scale, v.records, 49152) for k, v in results.items()}
    assert hits["tiers"]["hit_ratio"] >= 0.95 and hits["device"]["hit_ratio"] < 0.8
    ttft = {k: sorted(r.ttft_s for r in v.records)[len(v.records) // 2] for k, v in results.items()}
    assert ttft["tiers"] < ttft["device"]


def test_corun_factor_by_step_size_from_engine_step_spans(tmp_path):
    """bench/sim/steps.py reads a traced run's engine.step spans: a decode step that ran while the other worker
    was inside a step took 2x its alone ratio, a prefill chunk 1.25x; a class without steps takes the overall."""
    from bench.sim.steps import corun_by_tokens, load_steps
    from disagg.cluster.spans import STEP_ATTENTION_KPAIRS, STEP_EXECUTE_S, STEP_SEQS, STEP_TOKENS

    model = StepTimeModel(base=0.01, per_token=0.001, per_seq=0.0, per_attn=0.0)

    def span(start: float, tokens: int, factor: float) -> dict:
        execute = model.predict([1.0, tokens, 1.0, 0.0]) * factor
        attrs = {STEP_TOKENS: tokens, STEP_SEQS: 1, STEP_ATTENTION_KPAIRS: 0.0, STEP_EXECUTE_S: execute}
        return {"name": "engine.step", "start_ns": int(start * 1e9), "end_ns": int((start + execute) * 1e9),
                "attributes": attrs}

    # worker a: decode steps, 10 alone (t < 10) then 10 while b runs one long prefill step (t in 20..30)
    a = [span(i, 4, 1.2) for i in range(10)] + [span(20 + i * 0.5, 4, 2.4) for i in range(10)]
    # worker b: prefill chunks, 10 alone (t in 40..) then 10 while a runs a long step (t in 60..)
    b = [span(20, 512, 40.0)] + [span(40 + i, 512, 1.0) for i in range(10)] + [
        span(60.1 + i * 0.6, 512, 1.25) for i in range(10)]
    a.append(span(60, 4, 3000.0))  # the long step b's last chunks run beside
    for name, spans in (("worker-a", a), ("worker-b", b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in spans))
    out = corun_by_tokens(load_steps(tmp_path), model)
    by_edge = {edge: factor for edge, factor, *_ in out["by_tokens"]}
    assert by_edge[16] == pytest.approx(2.0)
    assert by_edge[512] == pytest.approx(1.25)
    assert by_edge[128] == out["corun_slowdown"]  # no step of that size: the overall factor
    assert out["by_busy"] == [[1, 1.0, 20]]  # one other busy at most (ten decode steps, ten chunks)


def test_a_step_is_counted_beside_the_workers_busy_over_its_span(tmp_path):
    """A long step that starts alone and then runs beside another worker's steps counts as beside one (by its
    start it would count as alone, and its stretch would land on the wrong count); one beside another for
    only half its span counts as neither."""
    from bench.sim.steps import load_steps, measure
    from disagg.cluster.spans import STEP_ATTENTION_KPAIRS, STEP_EXECUTE_S, STEP_SEQS, STEP_TOKENS

    def span(start: float, end: float) -> dict:
        attrs = {STEP_TOKENS: 4, STEP_SEQS: 1, STEP_ATTENTION_KPAIRS: 0.0, STEP_EXECUTE_S: end - start}
        return {"name": "engine.step", "start_ns": int(start * 1e9), "end_ns": int(end * 1e9), "attributes": attrs}

    spans = {"x": [span(0.0, 10.0), span(20.0, 30.0)], "y": [span(0.5, 5.0), span(5.0, 10.0), span(25.0, 40.0)]}
    for name, rows in spans.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in rows))
    counts = {w: [m.busy_others for m in ms] for w, ms in measure(load_steps(tmp_path), StepTimeModel()).items()}
    assert counts["x"] == [1, -1]  # 95% of its span beside y; then half of it
    assert counts["y"] == [1, 1, -1]


def test_a_machine_model_gives_the_co_run_factors_of_the_nearest_cluster_size():
    from disagg.sim.run import nearest_size

    sizes = {"by_workers": {"2": {"corun_slowdown": 1.2}, "4": {"corun_slowdown": 1.4}}}
    assert [nearest_size(sizes, n)["corun_slowdown"] for n in (1, 2, 3, 4, 64)] == [1.2, 1.2, 1.4, 1.4, 1.4]
    assert nearest_size({"corun_slowdown": 0.97}, 4) == {"corun_slowdown": 0.97}  # an older model: one set
