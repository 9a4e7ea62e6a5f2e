"""Operator endpoints for models at run time (admin scope, like every /admin/* route: http/auth.py).

- `GET /admin/models`: every model's state, requests in flight and workers; every alias with its weights.
- `POST /admin/models` (a deployment entry: id, path, prefill, decode, engine, aliases): start its workers, build
  its routing core, serve it; 201 once its workers answer (a new version is warm before any traffic moves to it).
  A bad entry is a 400 naming the field; an id that is served or loading, a 409; a model whose workers refuse to
  start (memory budget, a corrupt directory) a 400 with the workers' reason, and everything else keeps serving.
- `POST /admin/models/{id}/sleep` and `/wake`: http/admin_sleep.py.
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
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from disagg.errors import Conflict, InvalidRequest
from disagg.heap import settle_heap
from disagg.http.admin_sleep import add_sleep_routes, drain
from disagg.http.config import ApiConfig
from disagg.http.models import ModelLoader, ModelState, ModelTable, ServedModel
from disagg.models.adapters import check_adapter
from disagg.models.deployment import ModelEntry, check_name
from disagg.protocol import LoRARef
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
                # an adapter's requests and workers are its base's: listed once, there
                "in_flight": m.in_flight() if m.lora is None else None,
                "workers": {n: w.role.value for n, w in m.core.health.workers.items()} if m.lora is None else {},
                "encoders": m.encoders() if m.lora is None else [],  # what encodes a VLM's images (E/PD)
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


async def _unload_base(model: ServedModel, models: ModelTable, launcher: ModelLoader, config: ApiConfig) -> dict:
    """Drain a base model (new requests refused, those in flight finish), stop its core, end its workers."""
    name = model.name
    adapters = models.adapters_of(name)
    if adapters:
        raise Conflict(f"adapters {', '.join(adapters)} run on {name}; unload them first")
    if model.state not in (ModelState.SERVING, ModelState.SLEEPING):
        raise Conflict(f"{name} is {model.state.value}")
    if not [m for m in models.bases() if m.state is not ModelState.DRAINING and m.name != name]:
        raise Conflict("the last model cannot be unloaded (the endpoint would serve nothing)")
    model.state = ModelState.DRAINING  # from here no alias or adapter can attach to it (serving ids only)
    started = time.monotonic()
    drained = await drain(model, config)
    models.remove(name)
    await model.core.stop()  # a request still queued at a timed-out drain is refused, not left waiting
    await asyncio.to_thread(launcher.unload, model)
    settle_heap(f"unloaded {name}")  # its core's cycles were frozen with the start-up heap: free them now
    return {"id": name, "drained": drained, "drain_s": round(time.monotonic() - started, 3)}


def _names(entry: ModelEntry) -> list[str]:
    """Every name a model entry would serve: its id, its aliases, its adapters (409 if one repeats)."""
    names = [entry.id, *entry.aliases, *entry.adapters]
    if len(set(names)) != len(names):
        raise Conflict("the entry names one model, alias or adapter twice", param="id")
    return names


def add_model_admin_routes(
    app: FastAPI, models: ModelTable, loader: ModelLoader | None, config: ApiConfig, metrics: RouterMetrics
) -> None:
    add_sleep_routes(app, models, config, check=lambda: _loader(loader))

    def remember() -> None:  # after every change, on the event loop: the table must not change while it is read
        if loader is not None:  # what a restarted router serves again (cluster/runtime_table.py)
            loader.remember(models)

    @app.get("/admin/models")
    async def listing():
        return _listing(models)

    @app.post("/admin/models", status_code=201)
    async def load(entry: ModelEntry):
        launcher = _loader(loader)
        names = _names(entry)
        for name in names:
            models.check_free(name)
        models.loading.update(names)  # reserved: a second load of any of them is a 409 until this one ends
        try:
            served, adapters = await asyncio.to_thread(launcher.load, entry, entry.id)
        finally:
            models.loading.difference_update(names)
        served.core.on_queue_wait = metrics.queue_wait.observe
        served.core.start()
        models.add(served)
        for ref in adapters:
            models.add(served.adapter(ref))
        for alias in entry.aliases:
            models.aliases.set(alias, {served.name: 1.0}, models.serving_ids())
        remember()
        return served.card()

    @app.post("/admin/models/{base:path}/adapters", status_code=201)
    async def load_adapter(base: str, body: AdapterBody):
        parent = models.serving(base)
        check_name(body.name)
        models.check_free(body.name)
        path = str(Path(body.path).resolve())  # the workers read it, wherever they were started
        digest = await asyncio.to_thread(check_adapter, path, parent.model_dir)
        models.check_free(body.name)  # a load of the same name may have landed meanwhile
        if models.serving(base) is not parent:  # nor may its base have started to drain
            raise Conflict(f"{base} changed while the adapter was checked; try again")
        adapter = parent.adapter(LoRARef(body.name, path, digest))
        models.add(adapter)
        remember()
        return adapter.card()

    @app.delete("/admin/models/{name:path}")
    async def unload(name: str):
        model = models.served(name)
        aliases = models.aliases.pointing_at(name)
        if aliases:
            raise Conflict(f"alias(es) {', '.join(aliases)} still send requests to {name}; move them first")
        if model.lora is not None:  # its requests in flight carry the adapter: they finish where they run
            models.remove(name)
            remember()
            return {"id": name, "drained": True, "drain_s": 0.0}
        with models.change(name):
            try:
                return await _unload_base(model, models, _loader(loader), config)
            finally:
                remember()

    @app.put("/admin/aliases/{alias:path}")
    async def set_alias(alias: str, body: AliasBody):
        check_name(alias)
        if alias in models.loading:
            raise Conflict(f"{alias!r} is being loaded as a model")
        route = models.aliases.set(alias, body.targets, models.serving_ids())
        remember()
        return {"alias": alias, "targets": route.as_dict(), "shares": {t: route.share(t) for t in route.targets}}

    @app.delete("/admin/aliases/{alias:path}")
    async def remove_alias(alias: str):
        models.aliases.remove(alias)
        remember()
        return {"alias": alias, "removed": True}
