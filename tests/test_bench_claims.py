"""The lab's comparisons are not true by construction: pure functions of bench/ on hand-made inputs."""
from bench import stages
from disagg.workload.metrics import RequestRecord


def _spans(request_id: str, root_ms: float, stage_ms: dict[str, float]) -> list[dict]:
    ns = 1_000_000
    root = {"name": "text_completion", "trace_id": request_id, "start_ns": 0, "end_ns": int(root_ms * ns),
            "attributes": {"gen_ai.response.id": request_id}}
    out, t = [root], 0
    for name, ms in stage_ms.items():
        out.append({"name": name, "trace_id": request_id, "start_ns": t, "end_ns": t + int(ms * ns),
                    "attributes": {}})
        t += int(ms * ns)
    return out


def test_stage_breakdown_reports_what_the_named_stages_leave_of_e2e():
    named = {"router.queue": 1, "router.route": 1, "prefill.queue": 2, "prefill.compute": 50, "decode.compute": 30}
    # request a: stages cover 84 of 85 ms; request b: the router's span is 200 ms but its stages cover 84
    spans = _spans("a", 84.5, named) + _spans("b", 200, named)
    records = [RequestRecord(0, 10, 4, 0.0, e2e_s=0.085, request_id="a"),
               RequestRecord(1, 10, 4, 0.0, e2e_s=0.201, request_id="b")]
    result = stages.breakdown(records, spans)
    # a is within 2% on its named stages alone; b's 116 ms of router-span time no stage names is not hidden
    assert result["named_within_2pct_of_e2e"] == 0.5
    by_mean = {k: v["mean_ms"] for k, v in result["stages"].items()}
    assert abs(by_mean["unaccounted"] - (1 + 117) / 2) < 1e-6
    assert abs(by_mean["transit"] - (0.5 + 116) / 2) < 1e-6
    assert abs(by_mean["other"] - (0.5 + 1) / 2) < 1e-6


def test_overload_arms_share_one_reference_and_report_medians_with_range():
    from bench.sweeps import aggregate_sweeps

    def passes(*peaks):  # one pass = loads 1x, 4x; goodput at 4x is the given value, 1x is 1.0
        return [[{"load": 1.0, "goodput": 1.0}, {"load": 4.0, "goodput": g}] for g in peaks]
    # admission holds 1.8-2.0 req/s at 4x; without admission the peak is 2.5 (at 4x in one pass, 1x in others)
    out = aggregate_sweeps({"admission": passes(1.8, 2.0, 1.9), "no_admission": passes(0.5, 2.5, 0.9)})
    assert out["reference_goodput"] == 1.0  # median of the no-admission passes' peaks (1.0, 2.5, 1.0)
    four = out["admission"][1]
    assert (four["goodput"], four["goodput_min"], four["goodput_max"]) == (1.9, 1.8, 2.0)
    assert four["goodput_vs_reference"] == 1.9  # divided by the common reference, not by its own peak (2.0)
    assert out["no_admission"][1]["goodput_vs_reference"] == 0.9


def test_the_split_search_refines_to_one_worker_around_the_best():
    from disagg.planning.search import Search

    class Fake(Search):
        def __init__(self, peak: int) -> None:
            self.results, self.peak, self.calls = {}, peak, []

        def run(self, spec):
            self.calls.append(spec.num_prefill)
            # a single peak: goodput falls off by 1 per worker away from it
            return {"goodput": 100.0 - abs(spec.num_prefill - self.peak), "ttft_p90_ms": 1.0,
                    "prefill": spec.num_prefill, "decode": spec.num_decode}
    for peak in (1, 7, 37, 44, 62, 63):
        search = Fake(peak)
        rows = search.splits(64)
        best = max(rows, key=lambda p: rows[p]["goodput"])
        assert best == peak, (peak, sorted(rows))  # not the best of the coarse grid: the best split itself
        assert {peak - 1, peak + 1} & set(range(1, 64)) <= set(rows)  # both neighbours measured
        assert len(search.calls) == len(set(search.calls)) < 63  # refined, not exhaustive
    exhaustive = Fake(37)
    assert sorted(exhaustive.splits(64, exhaustive=True)) == list(range(1, 64))


def test_chaos_serving_again_is_the_first_successful_request_through_the_worker():
    from bench.chaos import Fault, Observer, by_kind, serving_again

    observer = Observer(router=None)
    observer.decisions = {"before": [{"decode": "d0", "prefill": None}],
                          "failed": [{"decode": "d0", "prefill": None}],
                          "moved": [{"decode": "d0", "prefill": None}, {"decode": "d1", "prefill": None}],
                          "other": [{"decode": "d1", "prefill": None}],
                          "served": [{"decode": "d0", "prefill": None}]}
    t0 = 1000.0
    fault = Fault("kill-decode", "d0", at=t0 + 10)
    records = [RequestRecord(0, 8, 4, 5.0, e2e_s=1.0, request_id="before"),  # started before the fault
               RequestRecord(1, 8, 4, 11.0, e2e_s=1.0, request_id="failed", error="boom"),
               RequestRecord(2, 8, 4, 12.0, e2e_s=1.0, request_id="moved"),  # migrated away: d1 served it
               RequestRecord(3, 8, 4, 13.0, e2e_s=1.0, request_id="other"),
               RequestRecord(4, 8, 4, 20.0, e2e_s=2.5, request_id="served")]
    assert serving_again(fault, records, t0, observer) == 12.5  # the end of "served", not a READY event
    # a request routed to the worker before its death was seen (it fell back elsewhere) does not count
    fault.out_of_routing_s = 1.3
    assert serving_again(fault, records, t0, observer) == 12.5
    records.insert(0, RequestRecord(5, 8, 4, 10.5, e2e_s=0.5, request_id="served"))  # before it left routing
    assert serving_again(fault, records, t0, observer) == 12.5
    assert serving_again(Fault("read-fail", "d0", at=t0), records, t0, observer) is None
    rows = [{"fault": "kill-decode", "lost": 0, "wrong_output": 0, "serving_again_s": v, "out_of_routing_s": 1.3,
             "ready_s": None, "endpoint_back_s": None, "max_stall_p99_ms": 10.0} for v in (12.0, 20.0, 14.0)]
    summary = by_kind(rows)["kill-decode"]
    assert summary["injections"] == 3 and summary["serving_again_s"] == {"median": 14.0, "worst": 20.0, "n": 3}
    assert summary["ready_s"] is None


def test_simulated_restart_time_comes_from_the_measured_chaos_run(tmp_path):
    import json

    from disagg.sim.faults import SimChaos

    rows = [{"fault": "kill-decode", "out_of_routing_s": 1.3, "serving_again_s": 15.0},
            {"fault": "kill-decode", "out_of_routing_s": 1.5, "serving_again_s": 17.0},
            {"fault": "kill-prefill", "out_of_routing_s": 1.2, "serving_again_s": 16.0},
            {"fault": "stop-decode", "out_of_routing_s": 1.4, "serving_again_s": 30.0},  # not a SIGKILL
            {"fault": "read-fail", "out_of_routing_s": None, "serving_again_s": None}]
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"faults": rows}))
    chaos = SimChaos.measured(path, kill_fraction=0.25)
    assert (chaos.detect_s, chaos.restart_s, chaos.kill_fraction) == (1.3, 16.0, 0.25)
    # the defaults are the documented real SIGKILL figures (13.2 / 14.5 s), not a guess below them
    assert 13.2 <= SimChaos.restart_s <= 14.5 and 1.33 <= SimChaos.detect_s <= 1.35


def test_engine_goal_is_met_only_when_the_ranges_do_not_overlap():
    from bench.engine_throughput import verdict

    assert verdict([39.7, 29.3, 41.4], [36.8, 36.4, 42.8]) == "not resolved"  # a better median is not enough
    assert verdict([45.0, 44.0, 46.0], [36.8, 36.4, 42.8]) == "met"
    assert verdict([455, 430, 481], [484, 483, 554]) == "missed"


def test_the_free_verification_bound_counts_only_the_tokens_proposals_saved():
    from bench.speculative import free_verification_bound

    # plain: 1.5 s for 128 tokens, 0.3 s of it to the first token: 127 steps of 1.2/127 s
    plain = [{"wall_s": 1.5, "ttft_mean_ms": 300.0, "output_tokens": 128}] * 3
    # 63 tokens came from accepted proposals: 64 steps are left, whatever verifying cost
    spec = [{"accepted": 63}, {"accepted": 63}, {"accepted": 10}]
    assert abs(free_verification_bound(plain, spec, 1) - 1.5 / (0.3 + 64 * 1.2 / 127)) < 1e-9
    # 8 requests of 16 tokens: the accepted tokens spread over them; none accepted: no gain
    batch = [{"wall_s": 1.5, "ttft_mean_ms": 300.0, "output_tokens": 128}]
    assert abs(free_verification_bound(batch, [{"accepted": 0}], 8) - 1.0) < 1e-9
    assert abs(free_verification_bound(batch, [{"accepted": 40}], 8) - 1.5 / (0.3 + 10 * 1.2 / 15)) < 1e-9


def test_peers_rounds_give_medians_and_verdicts_against_the_first_system():
    from bench.peers import across_rounds

    def run(system, goodput):
        return {"system": system, "workload": "conversation", "metrics": {"request_goodput": goodput}}

    runs = [run("vllm", 0.44), run("ours", 0.35), run("vllm", 0.30), run("ours", 0.34), run("vllm", 0.43)]
    runs += [run("ours", 0.36)]
    rows = {r["system"]: r for r in across_rounds(runs)}
    assert rows["vllm"]["goodput"]["median"] == 0.43 and "vs_vllm" not in rows["vllm"]
    assert rows["ours"]["goodput"] == {"median": 0.35, "min": 0.34, "max": 0.36, "runs": [0.35, 0.34, 0.36]}
    assert abs(rows["ours"]["vs_vllm"] - 0.35 / 0.43) < 1e-12
    assert rows["ours"]["verdict_vs_vllm"] == "not resolved"  # vLLM's 0.30 round is under ours
    runs[2] = run("vllm", 0.40)
    assert {r["system"]: r for r in across_rounds(runs)}["ours"]["verdict_vs_vllm"] == "missed"
