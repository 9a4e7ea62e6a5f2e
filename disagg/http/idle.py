"""Models that sleep when nobody asks for them and wake when somebody does - llama-swap's and Ollama's idle unload,
made cheap by http/admin_sleep.py's sleep: weights stay in memory, only the KV memory goes back, and a wake takes
milliseconds, not a cold load's seconds.

- `--sleep-after-idle-s S` (`IdleConfig`): a model that had no request for S seconds (its adapters' requests
  count as its own) and has none in flight sleeps, as `POST /admin/models/{id}/sleep` would put it to sleep.
- `--wake-on-request` (always on with the above): a request for an asleep model wakes it and waits, instead of
  the 503 `model_unavailable` an operator's sleep answers otherwise.  However many requests wait, the model wakes
  once (single flight); a request that arrives while a sleep, or an operator's wake, is under way waits for it to
  end and then wakes the model.  A wake that fails answers 503 `model_unavailable` saying why (the model stays
  asleep; the next request tries again); one that takes longer than `wake_timeout_s` answers the same.
- A model is idle from when these checks first see it (one loaded at run time gets its whole idle time).  An idle
  sleep gives up after `sleep_timeout_s` (a worker still leasing KV to a peer), and the model serves for another
  idle period before the next try.  A model whose workers cannot sleep (GPU workers: engine/sleep.py) is logged
  once and never tried again.
- `count_tokens` needs only the tokenizer: it neither wakes a model nor counts as a request.

Lifecycle: `start()` on the server's event loop runs the idle checks (planner/rounds.py) when `sleep_after_idle_s`
is set; `stop()` ends them.  Like every runtime change of the model table, one front door only: router replicas
refuse it (cluster/serve_cli.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from disagg.errors import SLEEP_UNSUPPORTED, DisaggError, ModelUnavailable
from disagg.http.admin_sleep import sleep_model, wake_model
from disagg.http.config import ApiConfig
from disagg.http.models import UNAVAILABLE_RETRY_AFTER_S, ModelState, ModelTable, ServedModel
from disagg.planner.rounds import Rounds
from disagg.telemetry import RouterMetrics

log = logging.getLogger(__name__)


class ModelIdler:
    def __init__(self, models: ModelTable, config: ApiConfig, metrics: RouterMetrics) -> None:
        self.models, self.api, self.config, self.metrics = models, config, config.idle, metrics
        self.last_request: dict[str, float] = {}  # base model -> when a request last asked for it (monotonic)
        self.cannot_sleep: set[str] = set()  # models whose workers refused to sleep (sleep_unsupported)
        self._wakes: dict[str, asyncio.Task] = {}  # model -> its wake under way (single flight)
        # an idle sleep drains and waits for its workers this long at most (an operator's sleep: model_drain_timeout_s)
        self.sleeping_api = dataclasses.replace(config, model_drain_timeout_s=self.config.sleep_timeout_s)
        self.rounds = Rounds("idle models", self.step, self.config.check_interval_s)

    def start(self) -> None:
        if self.config.sleep_after_idle_s > 0:
            self.rounds.start()

    async def stop(self) -> None:
        await self.rounds.stop()
        for task in list(self._wakes.values()):  # a wake under way finishes: cancelling it mid-way helps nobody
            await asyncio.gather(task, return_exceptions=True)

    async def ready(self, model: ServedModel) -> None:
        """Note a request for `model`; with wakes on, wait until its base takes requests, waking it if it sleeps.
        The caller still checks the model (an unloaded one stays refused)."""
        base = self.models.base_of(model)
        self.last_request[base.name] = time.monotonic()
        if not self.config.wakes or base.state is ModelState.SERVING:
            return
        deadline = time.monotonic() + self.config.wake_timeout_s
        while base.state is not ModelState.SERVING:
            waking = self._wakes.get(base.name)
            if waking is None and base.state is ModelState.SLEEPING and base.name not in self.models.changing:
                waking = self._wakes[base.name] = asyncio.get_running_loop().create_task(self._wake(base))
            if base.state is ModelState.DRAINING or base.name not in self.models.ids():
                return  # being unloaded: the caller's check refuses it
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._unavailable(base, f"did not wake within {self.config.wake_timeout_s:g}s")
            if waking is not None:  # shielded: a client that gives up does not cancel the others' wake
                await asyncio.wait([waking], timeout=left)
                if waking.done() and waking.exception() is not None:
                    raise self._unavailable(base, f"could not be woken: {waking.exception()}")
            else:  # a sleep, or an operator's wake, is under way: wait for it to end
                await asyncio.sleep(min(self.api.model_drain_poll_s, left))
            self.last_request[base.name] = time.monotonic()  # a long wait is not idleness

    async def _wake(self, model: ServedModel) -> None:
        try:
            if model.name in self.models.changing:  # an operator's call got in first: the waiters wait for it
                return
            with self.models.change(model.name):
                report = await wake_model(model, self.api)
            self.metrics.request_wakes.labels(model.name).inc()
            log.info("model %s woken by a request in %.3fs", model.name, report["seconds"])
        finally:
            self._wakes.pop(model.name, None)

    def _unavailable(self, model: ServedModel, why: str) -> ModelUnavailable:
        return ModelUnavailable(f"The model `{model.name}` {why}.", retry_after_s=UNAVAILABLE_RETRY_AFTER_S)

    def idle(self, model: ServedModel, now: float) -> bool:
        """Serving, unchanged, with no request in flight, and none asked for it for `sleep_after_idle_s` (a model
        is idle from when these checks first see it: one loaded at run time gets the whole time too)."""
        last = self.last_request.setdefault(model.name, now)
        return (
            model.state is ModelState.SERVING
            and model.name not in self.models.changing
            and model.name not in self._wakes
            and model.name not in self.cannot_sleep
            and now - last >= self.config.sleep_after_idle_s
            and not model.in_flight()
        )

    async def step(self) -> None:
        """One check: every idle base model sleeps (one at a time: each drains nothing, it is idle)."""
        for model in self.models.bases():
            if not self.idle(model, time.monotonic()):
                continue
            try:
                with self.models.change(model.name):
                    report = await sleep_model(model, self.sleeping_api)
            except DisaggError as exc:  # this model stays awake; the others are still looked at
                self.last_request[model.name] = time.monotonic()  # tried again after another idle period
                if exc.code == SLEEP_UNSUPPORTED:
                    self.cannot_sleep.add(model.name)
                    log.warning("model %s cannot sleep when idle: %s", model.name, exc)
                else:
                    log.warning("model %s did not sleep when idle: %s", model.name, exc)
                continue
            self.metrics.idle_sleeps.labels(model.name).inc()
            idle_s, released = self.config.sleep_after_idle_s, report["released_bytes"]
            log.info("model %s slept after %.0fs idle: %s bytes released", model.name, idle_s, released)
