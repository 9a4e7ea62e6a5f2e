"""Models that sleep when idle and wake on a request (http/idle.py) over a real routing core with fake workers:
one wake however many requests wait, a wake that fails answers 503 and the next request tries again, a request
that arrives during a sleep waits for it and then wakes the model, a model that cannot sleep is not tried again,
and without the option an asleep model still answers 503.  Over real HTTP on a Ray cluster:
tests/test_idle_live.py."""
import asyncio

import pytest

from disagg.errors import InvalidRequest, ModelUnavailable, WorkerLost
from disagg.http.config import ApiConfig, IdleConfig
from disagg.http.idle import ModelIdler
from disagg.http.models import ModelState, ModelTable, ServedModel
from disagg.protocol import SleepReport, SleepState
from disagg.router.router import RouterCore
from disagg.telemetry import RouterMetrics


class Worker:
    def __init__(self, name, delay_s=0.0):
        self.name, self.delay_s, self.asleep, self.calls = name, delay_s, False, []
        self.fail_wake = 0  # wakes that fail before one succeeds
        self.sleep_refusal = None

    async def sleep(self, timeout_s):
        self.calls.append("sleep")
        if self.sleep_refusal is not None:
            raise self.sleep_refusal
        await asyncio.sleep(self.delay_s)
        self.asleep = True
        return SleepReport(self.name, SleepState.ASLEEP, 1 << 20, self.delay_s, 0)

    async def wake(self, timeout_s):
        self.calls.append("wake")
        await asyncio.sleep(self.delay_s)
        if self.fail_wake:
            self.fail_wake -= 1
            raise WorkerLost(f"{self.name} died while waking")
        self.asleep = False
        return SleepReport(self.name, SleepState.AWAKE, 0, self.delay_s, 0)


def _setup(delay_s=0.0, **idle):
    workers = {n: Worker(n, delay_s) for n in ("w0", "w1")}
    model = ServedModel("m", RouterCore({}, workers), None, 512)
    table = ModelTable([model])
    api = ApiConfig(model_drain_poll_s=0.005, idle=IdleConfig(check_interval_s=0.01, **idle))
    metrics = RouterMetrics()
    return ModelIdler(table, api, metrics), table, model, workers, metrics


async def _until(cond, timeout_s=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


def _count(metrics, name):
    return metrics.registry.get_sample_value(name, {"model": "m"}) or 0.0


def test_an_idle_model_sleeps_and_many_requests_wake_it_once():
    idler, table, model, workers, metrics = _setup(delay_s=0.05, sleep_after_idle_s=0.05)

    async def main():
        idler.start()
        await _until(lambda: model.state is ModelState.SLEEPING and all(w.asleep for w in workers.values()))
        await asyncio.gather(*(idler.ready(model) for _ in range(8)))  # 8 requests arrive together
        table.check(model)  # takes requests again
        assert model.state is ModelState.SERVING and not any(w.asleep for w in workers.values())
        assert [w.calls.count("wake") for w in workers.values()] == [1, 1]  # one wake, not eight
        await idler.stop()

    asyncio.run(main())
    assert _count(metrics, "disagg:model_idle_sleeps_total") == 1
    assert _count(metrics, "disagg:model_request_wakes_total") == 1


def test_requests_keep_a_model_awake():
    idler, _, model, workers, _ = _setup(sleep_after_idle_s=0.2)

    async def main():
        idler.start()
        for _ in range(40):  # a request every 20 ms for 0.8 s: never 0.2 s without one
            await idler.ready(model)
            await asyncio.sleep(0.02)
        assert model.state is ModelState.SERVING and workers["w0"].calls == []
        await _until(lambda: model.state is ModelState.SLEEPING)  # then nobody asks: it sleeps
        await idler.stop()

    asyncio.run(main())


def test_a_wake_that_fails_answers_503_and_the_next_request_tries_again():
    idler, table, model, workers, metrics = _setup(wake_on_request=True)
    model.state = ModelState.SLEEPING  # an operator's sleep
    workers["w1"].fail_wake = 1

    async def main():
        with pytest.raises(ModelUnavailable, match="could not be woken") as refused:
            await idler.ready(model)
        assert refused.value.retry_after_s and model.state is ModelState.SLEEPING
        await idler.ready(model)
        table.check(model)

    asyncio.run(main())
    assert model.state is ModelState.SERVING and _count(metrics, "disagg:model_request_wakes_total") == 1


def test_a_request_during_a_sleep_waits_for_it_then_wakes_the_model():
    idler, table, model, workers, _ = _setup(delay_s=0.1, sleep_after_idle_s=0.01)

    async def main():
        idler.start()
        await _until(lambda: "sleep" in workers["w0"].calls)  # the sleep is under way
        assert model.state is ModelState.SLEEPING and not workers["w0"].asleep
        await idler.ready(model)
        table.check(model)
        assert workers["w0"].calls[:2] == ["sleep", "wake"] and not workers["w0"].asleep
        await idler.stop()

    asyncio.run(main())


def test_a_model_that_cannot_sleep_is_not_tried_again():
    idler, _, model, workers, _ = _setup(sleep_after_idle_s=0.01)
    workers["w0"].sleep_refusal = InvalidRequest("w0: sleep frees host pages; not on cuda", code="sleep_unsupported")

    async def main():
        idler.start()
        await _until(lambda: "m" in idler.cannot_sleep)
        await asyncio.sleep(0.1)  # ten more rounds
        await idler.stop()

    asyncio.run(main())
    assert workers["w0"].calls.count("sleep") == 1 and model.state is ModelState.SERVING  # (woken after the refusal)


def test_without_the_option_an_asleep_model_still_answers_503():
    idler, table, model, workers, _ = _setup()
    model.state = ModelState.SLEEPING

    async def main():
        await idler.ready(model)
        with pytest.raises(ModelUnavailable, match="is asleep"):
            table.check(model)

    asyncio.run(main())
    assert workers["w0"].calls == []


def test_a_model_added_later_gets_its_whole_idle_time_and_an_asleep_model_is_still_an_alias_target():
    idler, table, model, workers, _ = _setup(sleep_after_idle_s=0.3)

    async def main():
        idler.start()
        await _until(lambda: model.state is ModelState.SLEEPING)
        late = ServedModel("late", RouterCore({}, {"l0": Worker("l0")}), None, 512)
        table.add(late)  # loaded at run time, long after the checks started
        await asyncio.sleep(0.15)
        assert late.state is ModelState.SERVING  # not asleep at once: its idle time counts from now
        await _until(lambda: late.state is ModelState.SLEEPING)
        await idler.stop()

    asyncio.run(main())
    table.aliases.set("coder", {"m": 1.0}, table.serving_ids())  # asleep, yet a target: it wakes on a request


def test_an_idle_sleep_a_worker_holds_up_gives_up_soon_and_waits_another_idle_period():
    idler, _, model, workers, _ = _setup(sleep_after_idle_s=0.2, sleep_timeout_s=0.05)
    from disagg.errors import Conflict

    workers["w0"].sleep_refusal = Conflict("w0: KV blocks are still leased to a reader")

    async def main():
        idler.start()
        await _until(lambda: "sleep" in workers["w0"].calls)
        await _until(lambda: model.state is ModelState.SERVING and "m" not in idler.models.changing, timeout_s=1.0)
        tries = workers["w0"].calls.count("sleep")
        await asyncio.sleep(0.1)  # within the next idle period: not tried again
        assert workers["w0"].calls.count("sleep") == tries
        await idler.stop()

    asyncio.run(main())
