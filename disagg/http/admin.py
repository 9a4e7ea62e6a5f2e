"""Operator endpoints: GET /admin/roles (every worker's role, recent role changes, the planner's state) and
POST /admin/workers/{name}/role (move a worker between prefill / decode / both now: router/roles.py)."""

from __future__ import annotations

from fastapi import FastAPI

from disagg.http.schemas import RoleChangeBody
from disagg.planner.loop import PlannerLoop
from disagg.protocol import Role
from disagg.router.health import HealthMonitor
from disagg.router.roles import RoleChanger


def add_admin_routes(app: FastAPI, monitor: HealthMonitor, changer: RoleChanger, planner: PlannerLoop | None) -> None:
    @app.get("/admin/roles")
    async def roles():
        return {
            "roles": {n: w.role.value for n, w in monitor.workers.items()},
            "changes": [r.as_dict() for r in changer.records],
            "planner": planner.status() if planner is not None else None,
        }

    @app.post("/admin/workers/{name}/role")
    async def change_role(name: str, body: RoleChangeBody):
        record = await changer.change(name, Role(body.role), reason=body.reason)
        return record.as_dict()
