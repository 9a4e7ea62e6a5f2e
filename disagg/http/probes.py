"""Probes and scraping: /livez (the process answers), /readyz and /health (a decode-capable worker is READY; 503
otherwise, with the workers' states in /health's body), and /metrics (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from disagg.errors import ServiceUnavailable
from disagg.http.errors import error_response
from disagg.router.health import HealthMonitor
from disagg.telemetry import RouterMetrics


def add_probe_routes(app: FastAPI, monitor: HealthMonitor) -> None:
    def _status() -> dict[str, Any]:
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

    @app.get("/livez")
    async def livez():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not monitor.any_decoder_ready():
            return error_response(ServiceUnavailable("no decode worker is alive", code="no_workers"))
        return {"status": "ready"}

    @app.get("/health")
    async def health():
        status = _status()
        if not monitor.any_decoder_ready():
            return error_response(
                ServiceUnavailable("no decode worker is alive", code="no_workers"),
                extra={"status": "unavailable", **status},
            )
        return {"status": "ok", **status}


def add_metrics_route(app: FastAPI, metrics: RouterMetrics) -> None:
    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
