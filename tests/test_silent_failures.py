"""Silent worker failures in an in-process cluster (real engines on the tiny model; tests/fakes.py stands in for Ray
only), each injected through the worker's own fault injector (EngineConfig.faults): NaN logits lose no request,
a worker with corrupted weights is taken out by the canary and serves no wrong answer after, a worker slowed 5x
is drained."""
import asyncio
import time

import pytest

from disagg.config import EngineConfig, FaultConfig
from disagg.engine.engine import LLMEngine
from disagg.protocol import Request, Role, SamplingParams
from disagg.router.canary import CanaryConfig
from disagg.router.health import HealthConfig, WorkerState
from disagg.router.outliers import OutlierConfig
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore, RouterCoreConfig
from disagg.router.watch import SilentConfig
from tests.fakes import LocalWorkerHandle, local_worker

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPT = list(range(20, 70))
FAST = HealthConfig(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.5, liveness_timeout_s=2.0, restart_after_s=30)


async def _until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def _reference(model_dir, prompt=PROMPT):
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=64, block_size=16, max_model_len=512))
    return engine.generate([prompt], GREEDY)[0].token_ids


def _core(workers, silent=None, prefill=None):
    policy = PolicyConfig(kind="round_robin", min_remote_prefill_tokens=16, seed=0)
    return RouterCore(prefill or {}, workers, policy, 16, RouterCoreConfig(), FAST, silent=silent)


async def _stream(core, request):
    tokens = []
    async for delta in core.generate(request):
        tokens += delta.token_ids
    return tokens


def _workers(model_dir, faulty: FaultConfig, n=3, role=Role.BOTH):
    handles = {"a": LocalWorkerHandle(local_worker("a", model_dir, role, faults=faulty))}
    for name in "bcd"[: n - 1]:
        handles[name] = LocalWorkerHandle(local_worker(name, model_dir, role))
    return handles


def test_the_engine_never_serves_a_token_from_nan_logits(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, block_size=16, max_model_len=512,
                                    faults=FaultConfig(nan_from_step=3)))
    engine.add_request("r", PROMPT, GREEDY)
    served = []
    while engine.has_unfinished():
        served += [t for d in engine.step() for t in d.token_ids]
    faults = engine.drain_output_faults()
    assert [f.request_id for f in faults] == ["r"] and "non-finite" in faults[0].reason
    assert served == _reference(tiny_llama_dir)[: len(served)] and len(served) == 2  # steps 1 and 2 only


def test_nan_logits_lose_no_request_and_take_the_worker_out(tiny_llama_dir):
    nan = FaultConfig(nan_from_step=3)
    handles = _workers(tiny_llama_dir, nan, n=2)
    a = handles["a"]

    async def go():
        core = _core(handles)
        core.supervisor.start()
        rounds = []
        try:
            for injection in range(1, 4):  # injected three times: each restart brings the fault back
                results = await asyncio.gather(*(_stream(core, Request(f"r{injection}-{i}", PROMPT, GREEDY))
                                                 for i in range(4)))
                await _until(lambda: a.kills == injection, 5.0)
                rounds.append((results, core.health.workers["a"].reason))
                a.restart(local_worker("a", tiny_llama_dir, faults=nan))  # Ray's restart: a new incarnation
                await _until(lambda: core.health.routable("a"), 5.0)
            return rounds, core
        finally:
            await core.supervisor.stop()
    rounds, core = asyncio.run(go())
    reference = _reference(tiny_llama_dir)
    for results, reason in rounds:
        assert results == [reference] * 4  # no request lost, none served a token from NaN logits
        assert "non-finite logits" in reason
    assert core.counters.migrations >= 3  # a's requests moved to b


def test_a_prefill_worker_with_nan_logits_falls_back_to_a_local_prefill(tiny_llama_dir):
    p = LocalWorkerHandle(local_worker("p", tiny_llama_dir, Role.PREFILL, faults=FaultConfig(nan_from_step=1)))
    d = LocalWorkerHandle(local_worker("d", tiny_llama_dir, Role.DECODE))

    async def go():
        core = _core({"d": d}, prefill={"p": p})
        return await _stream(core, Request("r", PROMPT, GREEDY)), core
    tokens, core = asyncio.run(go())
    assert tokens == _reference(tiny_llama_dir) and core.recent_decisions()[-1]["prefill"] == "p"
    assert sum(core.counters.fallbacks.values()) == 1


def test_a_worker_with_corrupted_weights_is_taken_out_by_the_canary(tiny_llama_dir):
    corrupt = FaultConfig(corrupt_layer=0, corrupt_scale=4.0)
    handles = _workers(tiny_llama_dir, corrupt)
    a = handles["a"]
    canary = CanaryConfig(enabled=True, idle_interval_s=0.2, busy_interval_s=1.0, timeout_s=5.0, fail_after=2)
    detect_within_s = 10.0

    async def go():
        core = _core(handles, SilentConfig(canary=canary, check_interval_s=0.05))
        core.supervisor.start()
        core.watch.start()
        rounds = []
        try:
            for injection in range(1, 4):  # injected three times: each restart brings the corrupted weights back
                t0 = time.monotonic()
                await _until(lambda: a.kills == injection, detect_within_s)
                detected_s = time.monotonic() - t0
                # canaries count in no user metric: no decision, no latency sample, no served path
                untouched = (core.recent_decisions(), dict(core.counters.paths),
                             core.latency.attainment(1, 1, 1e9)[2])
                results = await asyncio.gather(*(_stream(core, Request(f"r{injection}-{i}", PROMPT, GREEDY))
                                                 for i in range(4)))
                rounds.append((detected_s, untouched, results, core.health.workers["a"].reason))
                core.latency.samples.clear()
                core.counters.paths.clear()
                core.decisions.clear()
                a.restart(local_worker("a", tiny_llama_dir, faults=corrupt))
                await _until(lambda: core.health.routable("a"), 5.0)
            return rounds, core
        finally:
            await core.watch.stop()
            await core.supervisor.stop()
    rounds, core = asyncio.run(go())
    reference = _reference(tiny_llama_dir)
    for detected_s, untouched, results, reason in rounds:
        assert detected_s < detect_within_s and "wrong canary answer" in reason
        assert untouched == ([], {}, 0)
        assert results == [reference] * 4  # no wrong answer after detection
    assert core.watch.counts.canary_failures == 3 and core.watch.book.reference is not None


def test_a_worker_slowed_5x_is_drained(tiny_llama_dir):
    handles = _workers(tiny_llama_dir, FaultConfig(slow_factor=5.0))
    outliers = OutlierConfig(enabled=True, ratio=2.5, bad_checks=3, good_checks=5)
    drain_within_s = 30.0

    async def go():
        core = _core(handles, SilentConfig(outliers=outliers, check_interval_s=0.1))
        core.supervisor.start()
        core.watch.start()
        try:
            t0 = time.monotonic()
            n = 0
            while core.health.workers["a"].state is not WorkerState.DRAINED:  # equal load on all three
                assert time.monotonic() - t0 < drain_within_s, "not drained in time"
                await asyncio.gather(*(_stream(core, Request(f"r{n + i}", PROMPT, GREEDY)) for i in range(3)))
                n += 3
            after = len(core.recent_decisions())
            results = await asyncio.gather(*(_stream(core, Request(f"s{i}", PROMPT, GREEDY)) for i in range(4)))
            return results, core, core.recent_decisions()[after:]
        finally:
            await core.watch.stop()
            await core.supervisor.stop()
    results, core, later = asyncio.run(go())
    assert results == [_reference(tiny_llama_dir)] * 4
    assert "a" not in {d["decode"] for d in later}  # drained: no new requests
    assert core.health.workers["a"].state is WorkerState.DRAINED and core.watch.counts.drains == 1
    assert handles["a"].kills == 0  # slow, not wrong: drained, not restarted
    assert any(e["worker"] == "a" and e["state"] == "drained" for e in core.health.recent_events())  # reported


def _order(faults):
    from disagg.cluster.worker_config import FaultOrder

    return FaultOrder(faults).to_wire()


def test_fault_orders_are_refused_unless_the_worker_was_started_for_drills(tiny_llama_dir):
    from disagg.cluster.launch import ClusterConfig
    from disagg.cluster.serve_cli import build_parser
    from disagg.errors import Forbidden

    worker = local_worker("w", tiny_llama_dir)  # started as `disagg serve` starts workers: no fault injection
    with pytest.raises(Forbidden, match="fault injection is off"):
        asyncio.run(worker.set_faults(_order(FaultConfig(nan_from_step=1))))
    assert worker.engine.runner.faults is None  # nothing was injected
    assert not ClusterConfig().allow_fault_injection and not ClusterConfig().worker("x", Role.BOTH, "x") \
        .allow_fault_injection
    assert "--allow-fault-injection" not in build_parser().format_help()  # no way to turn it on from the CLI


def test_fault_orders_change_a_running_worker_and_stop(tiny_llama_dir):
    """A running (pre-packed) worker takes the faults of an order from its next step on: corrupted weights give
    wrong greedy tokens, NaN logits fail the request with OutputCorrupt (and take the worker out), a slow factor
    is on its runner; an empty order stops the injection (not a weight corruption: that lasts until the process
    restarts, as real corruption would)."""
    from disagg.errors import OutputCorrupt

    reference = _reference(tiny_llama_dir)

    async def go():
        slow, nan, bad = (local_worker(n, tiny_llama_dir) for n in ("s", "n", "c"))
        for w in (slow, nan, bad):
            w.config.allow_fault_injection = True  # as `disagg bench chaos` starts its workers
        await slow.set_faults(_order(FaultConfig(slow_factor=5.0)))
        slowed = slow.engine.runner.faults.config.slow_factor
        assert await _stream_worker(LocalWorkerHandle(slow), "r1") == reference  # slow, not wrong
        await slow.set_faults(_order(None))
        await nan.set_faults(_order(FaultConfig(nan_from_step=1)))
        with pytest.raises(OutputCorrupt):
            await _stream_worker(LocalWorkerHandle(nan), "r2")
        await bad.set_faults(_order(FaultConfig(corrupt_layer=0, corrupt_scale=4.0)))
        wrong = await _stream_worker(LocalWorkerHandle(bad), "r3")
        await bad.set_faults(_order(None))
        still = await _stream_worker(LocalWorkerHandle(bad), "r4")
        return slowed, slow.engine.runner.faults, nan.fault, wrong, still
    slowed, cleared, fault, wrong, still = asyncio.run(go())
    assert slowed == 5.0 and cleared is None
    assert fault and "non-finite" in fault  # the worker took itself out
    assert wrong != reference and still == wrong  # wrong, finite tokens; they stay wrong until a restart


async def _stream_worker(handle, request_id):
    tokens = []
    async for delta in handle.generate(Request(request_id, PROMPT, GREEDY), None):
        tokens += delta.token_ids
    return tokens
