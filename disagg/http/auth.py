"""The front door's ASGI middleware: who is calling (http/keys.py: API key -> Caller, from `Authorization: Bearer`
or Anthropic's `x-api-key`; 401 for a wrong key, 403 for /admin without the admin scope or /metrics without the
metrics scope, 429 for a spent rate limit), and a request counter by endpoint and status for every request,
whatever its answer.  The endpoint is the route's template (`/v1/files/{file_id}`), never the path as sent: ids
and made-up paths must not each add a metric series."""

from __future__ import annotations

from starlette.routing import BaseRoute, Match

from disagg.errors import DisaggError
from disagg.http.errors import dialect_of, error_response, status_and_type
from disagg.http.keys import BEARER, KeyRing
from disagg.telemetry import RouterMetrics

TENANT_HEADER = "x-tenant-id"  # names the tenant only when no keys are configured
API_KEY_HEADER = "x-api-key"  # how Anthropic's clients send the key (OpenAI's: Authorization: Bearer)
GUARDED = ("/v1/", "/admin/", "/metrics")
ADMIN = "/admin/"
METRICS = "/metrics"
UNMATCHED = "unmatched"  # the endpoint label of a path no route serves


class AuthAndCount:
    """A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from the endpoint.
    The admitted caller is in the request's state (`caller`, and its `tenant`)."""

    def __init__(self, app, keys: KeyRing, metrics: RouterMetrics, routes: list[BaseRoute]) -> None:
        self.app, self.keys, self.metrics, self.routes = app, keys, metrics, routes

    def _endpoint(self, scope) -> str:
        """The template of the route that serves this path (or the route of the path with another method: a 405).
        Once the app has run, FastAPI's router has put that route in the scope; only a request refused here, before
        routing, is matched against the routes."""
        routed = scope.get("route")
        if routed is not None:
            return getattr(routed, "path", UNMATCHED)
        partial = UNMATCHED
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", UNMATCHED)
            if match is Match.PARTIAL and partial == UNMATCHED:
                partial = getattr(route, "path", UNMATCHED)
        return partial

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.startswith(GUARDED):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            client = scope.get("client")
            authorization = headers.get("authorization", "")
            if not authorization and API_KEY_HEADER in headers:
                authorization = BEARER + headers[API_KEY_HEADER]
            try:
                caller = self.keys.admit(
                    authorization,
                    headers.get(TENANT_HEADER),
                    admin_path=path.startswith(ADMIN),
                    client_host=client[0] if client else None,
                    metrics_path=path.startswith(METRICS),
                )
            except DisaggError as exc:
                self.metrics.requests.labels(self._endpoint(scope), str(status_and_type(exc)[0])).inc()
                await error_response(exc, dialect=dialect_of(path, headers))(scope, receive, send)
                return
            state = scope.setdefault("state", {})
            state["caller"], state["tenant"] = caller, caller.tenant
        status = {"code": 500}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(self._endpoint(scope), str(status["code"])).inc()
