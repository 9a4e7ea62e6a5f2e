"""The front door's ASGI middleware: API key -> tenant (401 if wrong), and a request counter by endpoint and
status for every request, whatever its answer."""

from __future__ import annotations

from collections.abc import Callable

from disagg.errors import Unauthorized
from disagg.http.errors import error_response
from disagg.telemetry import RouterMetrics

TENANT_HEADER = "x-tenant-id"


class AuthAndCount:
    """A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from the endpoint.
    `tenant_of(authorization, tenant_header)` names the caller's tenant, or None for a wrong key."""

    def __init__(self, app, tenant_of: Callable[[str, str | None], str | None], metrics: RouterMetrics) -> None:
        self.app, self.tenant_of, self.metrics = app, tenant_of, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.startswith(("/v1/", "/admin/")):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            tenant = self.tenant_of(headers.get("authorization", ""), headers.get(TENANT_HEADER))
            if tenant is None:
                self.metrics.requests.labels(path, "401").inc()
                await error_response(Unauthorized("invalid or missing API key", code="invalid_api_key"))(
                    scope, receive, send
                )
                return
            scope.setdefault("state", {})["tenant"] = tenant
        status = {"code": 500}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(path, str(status["code"])).inc()
