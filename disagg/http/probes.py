"""Probes and scraping: /livez (the process answers), /readyz and /health (a served model has a READY
decode-capable worker; 503 when none has, with the workers' states in /health's body, per model when there are
several: "degraded" while some model has none), and /metrics (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from disagg.errors import ServiceUnavailable
from disagg.http.errors import error_response
from disagg.http.models import ModelTable
from disagg.router.health import HealthMonitor
from disagg.telemetry import RouterMetrics


def _status(monitor: HealthMonitor) -> dict[str, Any]:
    workers = {
        n: {"role": w.role.value, "state": w.state.value, "reason": w.reason, "restarts": w.restarts}
        for n, w in monitor.workers.items()
    }
    live = monitor.live_counts()
    return {
        "live": live,
        "decode_workers": live["decode"] + live["both"],
        "prefill_workers": live["prefill"],
        "workers": workers,
    }


def add_probe_routes(app: FastAPI, models: ModelTable) -> None:
    def unready() -> list[str]:
        return [m.name for m in models.bases() if not m.core.health.any_decoder_ready()]

    def unavailable(names: list[str]) -> ServiceUnavailable:
        if len(models.bases()) == 1:
            return ServiceUnavailable("no decode worker is alive", code="no_workers")
        return ServiceUnavailable(f"no decode worker is alive for: {', '.join(names)}", code="no_workers")

    def status() -> dict[str, Any]:
        bases = models.bases()
        if len(bases) == 1:
            return _status(bases[0].core.health)
        return {"models": {m.name: _status(m.core.health) for m in bases}}

    @app.get("/livez")
    async def livez():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        names = unready()
        if len(names) == len(models.bases()):  # one model down leaves the others served: still in rotation
            return error_response(unavailable(names))
        return {"status": "ready", "unready_models": names} if names else {"status": "ready"}

    @app.get("/health")
    async def health():
        names = unready()
        if len(names) == len(models.bases()):
            return error_response(unavailable(names), extra={"status": "unavailable", **status()})
        return {"status": "degraded" if names else "ok", **status()}


def add_metrics_route(app: FastAPI, metrics: RouterMetrics) -> None:
    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
