"""RouterCore under faults with real engines in-process (tests/fakes.py stands in for Ray only): streams migrate
with outputs equal to a no-fault run, hung workers are detected by heartbeats, prefill failures fall back,
restarted workers rejoin, and every block comes back."""
import asyncio
import time

import pytest

from disagg.config import EngineConfig
from disagg.engine.engine import LLMEngine
from disagg.errors import ServiceUnavailable
from disagg.protocol import FallbackKind, Request, Role, SamplingParams, ServePath
from disagg.router.health import HealthConfig, WorkerState
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore, RouterCoreConfig
from disagg.stats import WorkerStats
from tests.fakes import LocalWorkerHandle, local_worker

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True)
PROMPT = list(range(20, 70))
FAST = HealthConfig(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.1, liveness_timeout_s=0.3, restart_after_s=30)


async def _until(predicate, timeout_s: float = 5.0) -> None:
    """Wait (bounded) for a condition the supervisor's loop makes true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def _reference(model_dir, sampling, prompt=PROMPT):
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=64, block_size=16, max_model_len=512))
    return engine.generate([prompt], sampling)[0].token_ids


def _core(prefill, decode, **config):
    policy = PolicyConfig(kind="round_robin", min_remote_prefill_tokens=16, seed=0)
    return RouterCore(prefill, decode, policy, 16, RouterCoreConfig(**config), FAST)


async def _wire(*handles):
    layouts = [await h.layout(1.0) for h in handles]
    for h in handles:
        await h.set_peers(layouts, 1.0)


async def _stream(core, request, on_token=None):
    tokens = []
    async for delta in core.generate(request):
        tokens += delta.token_ids
        if on_token is not None:
            on_token(len(tokens))
    return tokens


async def _baseline(handles, timeout=5.0):
    """Every worker back to no blocks held, no leases, nothing adopted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = [WorkerStats.from_wire(await h.worker.stats()) for h in handles]
        if all(s.kv_blocks_free == s.kv_blocks_total and not s.leases and not s.adopted_blocks for s in stats):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_decode_death_mid_stream_migrates_with_the_no_fault_output(tiny_llama_dir, sampling, caplog):
    a, b = (LocalWorkerHandle(local_worker(n, tiny_llama_dir)) for n in ("a", "b"))

    async def go():
        await _wire(a, b)
        core = _core({}, {"a": a, "b": b})

        def kill_after_five(n):
            if n == 5:
                a.dead = True
        tokens = await _stream(core, Request("r", PROMPT, sampling), kill_after_five)
        assert await _baseline([b])
        return tokens, core
    tokens, core = asyncio.run(go())
    assert tokens == _reference(tiny_llama_dir, sampling)
    assert core.counters.migrations == 1 and core.counters.paths[ServePath.MIGRATED] == 1
    assert [d["decode"] for d in core.recent_decisions()] == ["a", "b"]
    # the migration warning says why the worker was lost, not only that it was
    lost = [r.getMessage() for r in caplog.records if r.name == "disagg.router.drive" and "lost a" in r.getMessage()]
    assert len(lost) == 1 and "a is dead" in lost[0], lost


def test_disaggregated_request_migrates_through_a_remote_prefill_of_prompt_plus_output(tiny_llama_dir):
    p = LocalWorkerHandle(local_worker("p", tiny_llama_dir, Role.PREFILL))
    d1, d2 = (LocalWorkerHandle(local_worker(n, tiny_llama_dir, Role.DECODE)) for n in ("d1", "d2"))

    async def go():
        await _wire(p, d1, d2)
        core = _core({"p": p}, {"d1": d1, "d2": d2})

        def kill_after_seven(n):
            if n == 7:
                d1.dead = True
        tokens = await _stream(core, Request("r", PROMPT, SEEDED), kill_after_seven)
        assert await _baseline([p, d2])
        return tokens, core, WorkerStats.from_wire(await d2.worker.stats())
    tokens, core, d2_stats = asyncio.run(go())
    assert tokens == _reference(tiny_llama_dir, SEEDED)
    second = core.recent_decisions()[-1]
    assert second["decode"] == "d2" and second["prefill"] == "p"  # prompt + 7 tokens prefilled remotely
    assert d2_stats.transfer_reads == 1 and d2_stats.transfer_failures == 0


def test_hung_worker_is_taken_out_by_heartbeats_and_its_stream_moves(tiny_llama_dir):
    a, b = (LocalWorkerHandle(local_worker(n, tiny_llama_dir)) for n in ("a", "b"))

    async def go():
        await _wire(a, b)
        core = _core({}, {"a": a, "b": b})
        core.supervisor.start()
        hung_at = []

        def hang_after_four(n):
            if n == 4:
                a.hung = True  # a SIGSTOPped process: no answer, no error
                hung_at.append(time.monotonic())
        try:
            tokens = await _stream(core, Request("r", PROMPT, GREEDY), hang_after_four)
            out_of_routing = core.health.workers["a"].since - hung_at[0]
            return tokens, core, out_of_routing
        finally:
            await core.supervisor.stop()
    tokens, core, out_of_routing = asyncio.run(go())
    assert tokens == _reference(tiny_llama_dir, GREEDY)
    assert core.health.workers["a"].state is WorkerState.DEAD and 0 < out_of_routing < 1.0
    assert core.counters.migrations == 1


def test_last_decode_worker_lost_gives_an_explicit_error_then_serves_after_restart(tiny_llama_dir):
    a = LocalWorkerHandle(local_worker("a", tiny_llama_dir))

    async def go():
        core = _core({}, {"a": a})
        core.supervisor.start()
        try:
            def kill_after_three(n):
                if n == 3:
                    a.dead = True
            with pytest.raises(ServiceUnavailable):
                await _stream(core, Request("r1", PROMPT, GREEDY), kill_after_three)
            await _until(lambda: not core.health.any_decoder_ready())  # the supervisor sees the death
            with pytest.raises(ServiceUnavailable, match="no decode worker"):
                await _stream(core, Request("r2", PROMPT, GREEDY))
            a.restart(local_worker("a", tiny_llama_dir))  # Ray's restart: a new incarnation behind the handle
            deadline = time.monotonic() + 5
            while not core.health.routable("a") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert core.health.workers["a"].restarts == 1
            return await _stream(core, Request("r3", PROMPT, GREEDY))
        finally:
            await core.supervisor.stop()
    assert asyncio.run(go()) == _reference(tiny_llama_dir, GREEDY)


def test_migration_limit_is_enforced(tiny_llama_dir):
    a, b = (LocalWorkerHandle(local_worker(n, tiny_llama_dir)) for n in ("a", "b"))

    async def go():
        core = _core({}, {"a": a, "b": b}, max_migrations=0)

        def kill_after_two(n):
            if n == 2:
                a.dead = True
        with pytest.raises(ServiceUnavailable, match="giving up"):
            await _stream(core, Request("r", PROMPT, GREEDY), kill_after_two)
    asyncio.run(go())


@pytest.mark.parametrize("fault", ["dead", "hung"])
def test_prefill_failure_falls_back_to_local_prefill(tiny_llama_dir, fault):
    p = LocalWorkerHandle(local_worker("p", tiny_llama_dir, Role.PREFILL))
    d = LocalWorkerHandle(local_worker("d", tiny_llama_dir, Role.DECODE))
    setattr(p, fault, True)

    async def go():
        await _wire(d)
        core = _core({"p": p}, {"d": d}, prefill_timeout_s=0.3)
        tokens = await _stream(core, Request("r", PROMPT, GREEDY))
        assert await _baseline([d])
        return tokens, core
    tokens, core = asyncio.run(go())
    assert tokens == _reference(tiny_llama_dir, GREEDY)
    assert core.counters.fallbacks[FallbackKind.PREFILL] == 1 and core.counters.paths[ServePath.FALLBACK] == 1


def test_restarted_prefill_worker_is_rewired_and_stale_results_cannot_be_read(tiny_llama_dir):
    p = LocalWorkerHandle(local_worker("p", tiny_llama_dir, Role.PREFILL))
    d = LocalWorkerHandle(local_worker("d", tiny_llama_dir, Role.DECODE))

    async def go():
        await _wire(p, d)
        core = _core({"p": p}, {"d": d})
        core.supervisor.start()
        try:
            await _until(lambda: core.health.workers["p"].incarnation is not None)  # the first probe answered
            old_agent = p.worker.agent_name
            stale = await p.prefill(Request("stale", PROMPT, GREEDY), 5.0)
            p.dead = True
            await _until(lambda: core.health.workers["p"].state is WorkerState.DEAD)
            p.restart(local_worker("p", tiny_llama_dir, Role.PREFILL))
            deadline = time.monotonic() + 5
            while not core.health.routable("p") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert core.health.routable("p") and p.worker.agent_name != old_agent
            peers = {lay.agent_name for lay in d.worker.transport.peer_layouts()}
            assert p.worker.agent_name in peers and old_agent not in peers  # the old agent was dropped
            # a result from the dead incarnation names its old agent: the read fails and d recomputes
            tokens = []
            async for delta in d.generate(Request("stale", PROMPT, GREEDY), stale):
                tokens += delta.token_ids
            assert tokens == _reference(tiny_llama_dir, GREEDY)
            assert WorkerStats.from_wire(await d.worker.stats()).transfer_failures == 1
            return await _stream(core, Request("fresh", PROMPT, GREEDY)), core
        finally:
            await core.supervisor.stop()
    tokens, core = asyncio.run(go())
    assert tokens == _reference(tiny_llama_dir, GREEDY)
    assert core.recent_decisions()[-1]["prefill"] == "p"


def test_a_slow_lease_release_does_not_hold_back_the_end_of_the_stream(tiny_llama_dir):
    """The router's safety-net release of a remote prefill's lease runs off the request's path: a prefill
    worker busy with a long step (here: a release that takes 2 s) must not delay the client's last chunk."""
    class SlowRelease(LocalWorkerHandle):
        async def release(self, request_id: str) -> None:
            await asyncio.sleep(2.0)
            await super().release(request_id)

    p = SlowRelease(local_worker("p", tiny_llama_dir, Role.PREFILL))
    d = LocalWorkerHandle(local_worker("d", tiny_llama_dir, Role.DECODE))

    async def go():
        await _wire(p, d)
        core = _core({"p": p}, {"d": d})
        t0 = time.monotonic()
        tokens = await _stream(core, Request("r", PROMPT, GREEDY))
        elapsed = time.monotonic() - t0
        assert core.recent_decisions()[-1]["prefill"] == "p"  # it went through the remote prefill
        assert await _baseline([p, d])
        return tokens, elapsed
    tokens, elapsed = asyncio.run(go())
    assert tokens == _reference(tiny_llama_dir, GREEDY)
    assert elapsed < 1.5, elapsed  # the 2 s release did not sit between the last token and the end


def test_a_client_that_stops_at_the_last_token_leaves_no_load_behind(tiny_llama_dir):
    """The HTTP layer stops reading at the finished delta (the generator is closed there): the request's load,
    lease and latency must be settled by then, or the worker looks busy forever and the queue stalls."""
    p = LocalWorkerHandle(local_worker("p", tiny_llama_dir, Role.PREFILL))
    d = LocalWorkerHandle(local_worker("d", tiny_llama_dir, Role.DECODE))

    async def go():
        await _wire(p, d)
        core = _core({"p": p}, {"d": d})
        for i in range(3):
            stream = core.generate(Request(f"r{i}", PROMPT, GREEDY))
            async for delta in stream:
                if delta.finished:
                    break  # what a client that got its answer does: no more reads
            await stream.aclose()
        return core
    core = asyncio.run(go())
    assert all(load.active_requests == 0 and load.queued_prefill_tokens == 0 for load in core.loads.values())
    assert core.latency.attainment(10.0, 10.0, 1e9, time.monotonic())[2] == 3  # every request's latency recorded


def test_flexible_a_full_decode_worker_sends_a_request_whole_to_the_idle_prefill_worker_and_its_death_migrates(
    tiny_llama_dir,
):
    """One slot per worker (max_running=1): while `d` streams the first request, the second has no decode worker
    with room and goes whole to the idle prefill worker `p` (flexible workers); `p` dies mid-stream and the request
    moves to `d` once it has room, with the no-fault output.  Without flexible workers it waits for `d`."""
    from disagg.router.admission import CapacityConfig
    from disagg.router.placement import Placement

    second = list(range(100, 140))
    for flexible in (True, False):
        p = LocalWorkerHandle(local_worker("p", tiny_llama_dir, Role.PREFILL))
        d = LocalWorkerHandle(local_worker("d", tiny_llama_dir, Role.DECODE))

        async def go():
            await _wire(p, d)
            policy = PolicyConfig(placement=Placement.COST, flexible=flexible, seed=0)
            core = RouterCore({"p": p}, {"d": d}, policy, 16, RouterCoreConfig(), FAST,
                              capacity=CapacityConfig(max_running=1))
            core.start()
            started = asyncio.Event()

            def first_going(n):
                if n == 2:
                    started.set()

            def kill_p(n):
                if n == 5 and flexible:
                    p.dead = True
            one = asyncio.create_task(_stream(core, Request("a", PROMPT, GREEDY), first_going))
            await started.wait()
            two = asyncio.create_task(_stream(core, Request("b", second, GREEDY), kill_p))
            tokens = await asyncio.gather(one, two)
            await core.stop()
            return tokens, core
        (a, b), core = asyncio.run(go())
        assert a == _reference(tiny_llama_dir, GREEDY) and b == _reference(tiny_llama_dir, GREEDY, second)
        decisions = [(r["request_id"], r["decode"]) for r in core.recent_decisions()]
        if flexible:
            assert decisions == [("a", "d"), ("b", "p"), ("b", "d")], decisions
            assert core.counters.migrations == 1
        else:
            assert decisions == [("a", "d"), ("b", "d")], decisions
