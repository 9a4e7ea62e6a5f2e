"""A worker whose engine steps keep failing gives up past its failure budget instead of retrying forever: the
requests waiting on it fail with WorkerLost (the router migrates them), new ones are refused, and its heartbeat
says it is unhealthy so the router's health monitor takes it out."""
import asyncio

import pytest

from disagg.cluster.step_budget import StepBudget
from disagg.errors import WorkerLost
from disagg.protocol import Request, Role, SamplingParams
from disagg.router.health import Action, HealthConfig, HealthMonitor
from disagg.stats import Heartbeat
from tests.fakes import local_worker

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def test_the_budget_backs_off_then_gives_up_past_its_count():
    budget = StepBudget("w", budget=2, backoff_s=0.1, max_backoff_failures=1)
    boom = RuntimeError("boom")
    assert budget.failed(boom) == pytest.approx(0.1) and budget.failed(boom) == pytest.approx(0.1)
    assert budget.healthy
    assert budget.failed(boom) is None and not budget.healthy and "3 engine steps" in budget.gave_up
    with pytest.raises(WorkerLost) as exc:
        budget.check()
    assert exc.value.code == "step_failures" and exc.value.worker == "w"
    budget.ok()
    assert budget.failures == 0 and not budget.healthy  # giving up is for good: the worker waits to be restarted


def test_a_worker_whose_steps_keep_failing_fails_its_requests_and_reports_itself_unhealthy(tiny_llama_dir):
    worker = local_worker("w", tiny_llama_dir)
    worker.budget.budget, worker.budget.backoff_s = 3, 0.001
    steps = []

    def broken_step():
        steps.append(1)
        raise RuntimeError("device lost")

    worker.engine.step = broken_step

    async def go():
        stream = worker.generate(Request("r", [5, 6, 7, 8], GREEDY).to_wire())
        with pytest.raises(WorkerLost) as exc:  # without a budget the request waits forever
            await asyncio.wait_for(stream.__anext__(), timeout=30)
        assert exc.value.code == "step_failures" and "device lost" in exc.value.message
        with pytest.raises(WorkerLost):  # refused at once: nothing would serve it
            await asyncio.wait_for(worker.generate(Request("r2", [5, 6], GREEDY).to_wire()).__anext__(), 5)
        hb = Heartbeat.from_wire(worker.heartbeat())
        await asyncio.sleep(0.05)  # the heartbeat did not restart the loop
        return hb

    hb = asyncio.run(go())
    assert len(steps) == 4  # the budget's 3 failures tolerated, the 4th ends the loop
    assert not hb.healthy and hb.consecutive_step_failures == 4
    monitor = HealthMonitor(HealthConfig(max_step_failures=10), {"w": Role.BOTH}, clock=lambda: 0.0)
    first = Heartbeat.from_wire(worker.heartbeat())
    monitor.on_heartbeat("w", Heartbeat(**{**first.__dict__, "healthy": True, "consecutive_step_failures": 0}))
    assert monitor.on_heartbeat("w", hb) is Action.KILL and not monitor.routable("w")
