"""Operator endpoints: GET /admin/roles (every worker's role, recent role changes, the planner's state; per model
under `models` when the deployment has several), POST /admin/workers/{name}/role (move a worker between
prefill / decode / both now, within its model's pools: router/roles.py) and GET /admin/fleet (the fleet planner's
moves between models, and each model's awake and parked workers: planner/fleet_loop.py)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from disagg.errors import NotFound
from disagg.http.models import ModelTable, ServedModel
from disagg.http.schemas import RoleChangeBody
from disagg.planner.fleet_loop import FleetLoop
from disagg.protocol import Role


def _roles(model: ServedModel) -> dict[str, Any]:
    core = model.core
    return {
        "roles": {n: w.role.value for n, w in core.health.workers.items()},
        "changes": [r.as_dict() for r in core.roles.records],
        "planner": core.planner.status() if core.planner is not None else None,
    }


def add_admin_routes(app: FastAPI, models: ModelTable, fleet: FleetLoop | None = None) -> None:
    @app.get("/admin/fleet")
    async def fleet_status():
        if fleet is None:
            raise NotFound("this router has no fleet planner", code="no_fleet")
        return fleet.status()

    @app.get("/admin/roles")
    async def roles():
        per_model = {m.name: _roles(m) for m in models.bases()}
        if len(per_model) == 1:
            return next(iter(per_model.values()))
        return {"models": per_model}

    @app.post("/admin/workers/{name}/role")
    async def change_role(name: str, body: RoleChangeBody):
        record = await models.core_of_worker(name).roles.change(name, Role(body.role), reason=body.reason)
        return record.as_dict()
