"""Sleep and wake a model at run time (admin scope, like every /admin/* route: http/auth.py), as vLLM's
`/sleep` and `/wake_up`: a model nobody asks for gives its KV memory back, and serves again in well under a cold
load's time.

- `POST /admin/models/{id}/sleep`: new requests for it (and its adapters) get 503 `model_unavailable` with
  Retry-After; the ones in flight finish (up to `model_drain_timeout_s`); its routing core stops canaries and
  planning; then every worker forgets its prefix cache and gives its KV pages back (engine/sleep.py), keeping its
  weights, its tiers and its NIXL registration.  Answers with the bytes released and each worker's report.
- `POST /admin/models/{id}/wake`: every worker takes its KV memory again, the core resumes, requests are served.
A failed sleep wakes the workers it put to sleep and serves again (if one of them will not wake, the model stays
asleep for a later wake); a failed wake leaves the model asleep (wake again).  A worker Ray restarts meanwhile
comes back awake: waking it is a no-op.  Workers the fleet planner parked (router/parking.py) stay as they are.
Unload works on a sleeping model.  Like loads, refused (400 `runtime_models_unavailable`) behind router replicas,
which share no model table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from disagg.errors import Conflict
from disagg.http.config import ApiConfig
from disagg.http.models import ModelState, ModelTable, ServedModel
from disagg.protocol import SleepReport
from disagg.router.handles import WorkerHandle


async def drain(model: ServedModel, config: ApiConfig) -> bool:
    """Wait for its requests in flight to finish; False if some were still running at the timeout."""
    deadline = time.monotonic() + config.model_drain_timeout_s
    while model.in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(config.model_drain_poll_s)
    return not model.in_flight()


Call = Callable[[WorkerHandle], Awaitable[SleepReport]]


async def _each(model: ServedModel, call: Call, config: ApiConfig) -> dict[str, SleepReport]:
    """`call` on every worker of the model at once.  A worker that answers Conflict (a reader has not released
    its lease yet) is asked again until the drain timeout."""
    deadline = time.monotonic() + config.model_drain_timeout_s

    async def one(handle: WorkerHandle) -> SleepReport:
        while True:
            try:
                return await call(handle)
            except Conflict:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(config.model_drain_poll_s)

    handles = model.core.unparked()
    answers = await asyncio.gather(*(one(h) for h in handles), return_exceptions=True)  # all done before a raise
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return {h.name: r for h, r in zip(handles, answers) if isinstance(r, SleepReport)}


def _summary(model: ServedModel, reports: dict[str, SleepReport], started: float) -> dict[str, object]:
    return {
        "id": model.name,
        "state": model.state.value,
        "seconds": round(time.monotonic() - started, 4),
        "released_bytes": sum(r.released_bytes for r in reports.values()),
        "workers": {
            name: {
                "state": r.state.value,
                "released_bytes": r.released_bytes,
                "seconds": round(r.seconds, 4),
                "resident_bytes": r.resident_bytes,
            }
            for name, r in reports.items()
        },
    }


async def sleep_model(model: ServedModel, config: ApiConfig) -> dict[str, object]:
    started = time.monotonic()
    model.state = ModelState.SLEEPING  # from here its requests get 503s
    timeout = config.worker_sleep_timeout_s
    paused = False
    try:
        if not await drain(model, config):
            raise Conflict(f"{model.name}: requests were still running after {config.model_drain_timeout_s}s")
        await model.core.pause()
        paused = True
        reports = await _each(model, lambda h: h.sleep(timeout), config)
    except BaseException:  # serve again: wake whatever went to sleep
        woken = True
        if paused:
            answers = await asyncio.gather(*(h.wake(timeout) for h in model.core.unparked()), return_exceptions=True)
            woken = not any(isinstance(a, BaseException) for a in answers)
            if woken:
                model.core.resume()
        # a worker that did not wake leaves the model asleep: a later /wake retries it (and resumes the core)
        model.state = ModelState.SERVING if woken else ModelState.SLEEPING
        raise
    return _summary(model, reports, started)


async def wake_model(model: ServedModel, config: ApiConfig) -> dict[str, object]:
    started = time.monotonic()
    model.state = ModelState.WAKING
    try:
        timeout = config.worker_sleep_timeout_s
        reports = await _each(model, lambda h: h.wake(timeout), config)
    except BaseException:
        model.state = ModelState.SLEEPING
        raise
    model.core.resume()
    model.state = ModelState.SERVING
    return _summary(model, reports, started)


def add_sleep_routes(app: FastAPI, models: ModelTable, config: ApiConfig, *, check: Callable[[], object]) -> None:
    """`check` raises when models cannot change at run time here (router replicas: each has its own model table)."""

    @app.post("/admin/models/{name:path}/sleep")
    async def sleep(name: str):
        check()
        model = models.serving(name)  # a base model that takes requests (409 otherwise)
        with models.change(name):
            return await sleep_model(model, config)

    @app.post("/admin/models/{name:path}/wake")
    async def wake(name: str):
        check()
        model = models.served(name)
        if model.lora is not None or model.state is not ModelState.SLEEPING:
            raise Conflict(f"{name} is not an asleep model (it is {model.state.value})")
        with models.change(name):
            return await wake_model(model, config)
