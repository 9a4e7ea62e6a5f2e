"""Operator endpoints for models at run time (admin scope, like every /admin/* route: http/auth.py).

- `GET /admin/models`: every model's state, requests in flight and workers; every alias with its weights.
- `POST /admin/models` (a deployment entry: id, path, prefill, decode, engine, aliases): start its workers, build
  its routing core, serve it; 201 once its workers answer (a new version is warm before any traffic moves to it).
  A bad entry is a 400 naming the field; an id that is served or loading, a 409; a model whose workers refuse to
  start (memory budget, a corrupt directory) a 400 with the workers' reason, and everything else keeps serving.
- `DELETE /admin/models/{id}`: drain - new requests for it get 503 `model_unavailable` with Retry-After, the ones
  in flight finish (up to `model_drain_timeout_s`) - then stop its core and end its workers.  Refused (409) while
  an alias still sends it requests, and for the last model.
- `PUT /admin/aliases/{alias}` `{"targets": {"coder@1": 90, "coder@2": 10}}`: a canary share, a cut-over or a
  rollback, in one call; `DELETE /admin/aliases/{alias}`.
Blue/green replace is those calls in order: load `coder@2`, move the alias (a canary weight first), unload
`coder@1`; rollback is the alias put back while `coder@1` still serves.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from disagg.errors import Conflict, InvalidRequest
from disagg.http.config import ApiConfig
from disagg.http.models import ModelLoader, ModelState, ModelTable, ServedModel
from disagg.models.adapters import AdapterError, check_adapter
from disagg.models.deployment import DeploymentError, ModelEntry, check_name
from disagg.telemetry import RouterMetrics


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


class AliasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: dict[str, float]


def _listing(models: ModelTable) -> dict[str, object]:
    return {
        "models": [
            {
                "id": m.name,
                "state": m.state.value,
                "parent": m.parent,  # an adapter's base model (its workers are the base's)
                "in_flight": m.in_flight(),
                "workers": {n: w.role.value for n, w in m.core.health.workers.items()},
            }
            for m in models
        ],
        "loading": sorted(models.loading),
        "aliases": {alias: route.as_dict() for alias, route in models.aliases.items()},
    }


def _loader(loader: ModelLoader | None) -> ModelLoader:
    if loader is None:
        raise InvalidRequest(
            "models cannot be loaded or unloaded at run time here (router replicas, or a router not started by "
            "`disagg serve`); change the deployment file and restart instead",
            code="runtime_models_unavailable",
        )
    return loader


async def _drain(model: ServedModel, config: ApiConfig) -> bool:
    """Wait for its requests in flight to finish; False if some were still running at the timeout."""
    deadline = time.monotonic() + config.model_drain_timeout_s
    while model.in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(config.model_drain_poll_s)
    return not model.in_flight()


def add_model_admin_routes(
    app: FastAPI, models: ModelTable, loader: ModelLoader | None, config: ApiConfig, metrics: RouterMetrics
) -> None:
    @app.get("/admin/models")
    async def listing():
        return _listing(models)

    @app.post("/admin/models", status_code=201)
    async def load(entry: ModelEntry):
        launcher = _loader(loader)
        for alias in entry.aliases:
            models.check_free(alias)  # an alias may not take a served name either
        models.reserve(entry.id)
        try:
            served = await asyncio.to_thread(launcher.load, entry, entry.id)
        except DeploymentError as exc:
            raise InvalidRequest(str(exc), param="model") from None
        finally:
            models.loading.discard(entry.id)
        served.core.on_queue_wait = metrics.queue_wait.observe
        served.core.start()
        models.add(served)
        for alias in entry.aliases:
            models.aliases.set(alias, {served.name: 1.0}, models.ids())
        return served.card()

    @app.post("/admin/models/{base:path}/adapters", status_code=201)
    async def load_adapter(base: str, body: AdapterBody):
        parent = models.served(base)
        if parent.lora is not None:
            raise InvalidRequest(f"{base} is an adapter; an adapter's base is a model", param="model")
        models.check_free(body.name)
        try:
            check_name(body.name)
            await asyncio.to_thread(check_adapter, body.path, parent.model_dir)
        except (AdapterError, DeploymentError) as exc:
            raise InvalidRequest(str(exc), param="path") from None
        models.check_free(body.name)  # a load of the same name may have landed meanwhile
        adapter = parent.adapter(body.name, body.path)
        models.add(adapter)
        return adapter.card()

    @app.delete("/admin/models/{name:path}")
    async def unload(name: str):
        model = models.served(name)
        aliases = models.aliases.pointing_at(name)
        if aliases:
            raise Conflict(f"alias(es) {', '.join(aliases)} still send requests to {name}; move them first")
        if model.lora is not None:  # its requests in flight carry the adapter: they finish where they run
            models.remove(name)
            return {"id": name, "drained": True, "drain_s": 0.0}
        launcher = _loader(loader)
        adapters = models.adapters_of(name)
        if adapters:
            raise Conflict(f"adapters {', '.join(adapters)} run on {name}; unload them first")
        if len(models.bases()) == 1:
            raise Conflict("the last model cannot be unloaded (the endpoint would serve nothing)")
        if model.state is ModelState.DRAINING:
            raise Conflict(f"{name} is already being unloaded")
        model.state = ModelState.DRAINING
        started = time.monotonic()
        drained = await _drain(model, config)
        models.remove(name)
        await model.core.stop()
        await asyncio.to_thread(launcher.unload, model)
        return {"id": name, "drained": drained, "drain_s": round(time.monotonic() - started, 3)}

    @app.put("/admin/aliases/{alias:path}")
    async def set_alias(alias: str, body: AliasBody):
        if alias in models.loading:
            raise Conflict(f"{alias!r} is being loaded as a model")
        route = models.aliases.set(alias, body.targets, models.ids())
        return {"alias": alias, "targets": route.as_dict(), "shares": {t: route.share(t) for t in route.targets}}

    @app.delete("/admin/aliases/{alias:path}")
    async def remove_alias(alias: str):
        models.aliases.remove(alias)
        return {"alias": alias, "removed": True}
