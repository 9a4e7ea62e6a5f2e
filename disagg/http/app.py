"""The HTTP front door (FastAPI): builds the app over the served models (http/models.py: one routing core each) -
OpenAI-compatible generation (http/openai.py), the OpenAI Responses API (http/responses.py) and Anthropic's
Messages API (http/messages.py), all served through one http/serving.py; uploads (the OpenAI Files API:
http/files.py); probes and /metrics (http/probes.py); operator endpoints (http/admin.py) - with the API-key
middleware (http/auth.py) and the error handlers (http/errors.py, the one place errors map to HTTP).

Errors are in each API's shape (OpenAI's; Anthropic's on /v1/messages); an unexpected exception is a JSON 500,
never a plain-text one.

Lifecycle: the app's lifespan only starts every model's core's background tasks on the server's event loop
(`RouterCore.start`: admission dispatch, health supervisor, planner loop), then the fleet planner and the idle
models' checks (http/idle.py), and stops them on shutdown (`RouterCore.stop`, which also lets background lease
releases finish).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from disagg.http.admin import add_admin_routes
from disagg.http.admin_models import add_model_admin_routes
from disagg.http.auth import AuthAndCount
from disagg.http.config import ApiConfig
from disagg.http.errors import install_error_handlers
from disagg.http.file_store import FileStore, FileStorePort, LocalFiles
from disagg.http.files import add_files_routes
from disagg.http.idle import ModelIdler
from disagg.http.keys import KeyRing
from disagg.http.messages import add_messages_routes
from disagg.http.models import ModelLoader, ModelTable
from disagg.http.openai import add_openai_routes
from disagg.http.probes import add_metrics_route, add_probe_routes
from disagg.http.response_store import LocalResponses, ResponseStore, ResponseStorePort
from disagg.http.responses import add_responses_routes
from disagg.http.serving import Server
from disagg.planner.fleet_loop import FleetLoop
from disagg.router.metrics_view import cluster_snapshot
from disagg.telemetry import FleetCollector, RouterMetrics


def build_app(
    models: ModelTable,
    config: ApiConfig,
    responses: ResponseStorePort | None = None,
    loader: ModelLoader | None = None,
    fleet: FleetLoop | None = None,
    *,
    files: FileStorePort | None = None,
) -> FastAPI:
    """`models`: what this front door serves, each over its own routing core.  `responses`: where the Responses
    API keeps responses (None: in this process, sized by `config.responses`; router replicas pass the store they
    share).  `loader`: starts and ends models' workers for /admin/models (None: the deployment is fixed).  `fleet`:
    the fleet planner's loop (started after the cores, stopped before them; it runs only when enabled).  `files`:
    where the Files API keeps uploads (None: in this process, sized by `config.files`; replicas share one)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        for core in models.cores():
            core.start()
        if fleet is not None:
            fleet.start()
        idle.start()
        yield
        await idle.stop()
        if fleet is not None:
            await fleet.stop()
        for core in models.cores():  # with those loaded since (http/admin_models.py)
            await core.stop()

    app = FastAPI(title="disagg", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = RouterMetrics(models=lambda: {m.name: cluster_snapshot(m.core) for m in models.bases()})
    idle = ModelIdler(models, config, metrics)  # sleeps idle models, wakes asked-for ones (when configured)
    for core in models.cores():
        core.on_queue_wait = metrics.queue_wait.observe
    app.state.metrics = metrics
    if fleet is not None:
        metrics.registry.register(FleetCollector(fleet))

    install_error_handlers(app)
    app.add_middleware(AuthAndCount, keys=KeyRing(config.grants()), metrics=metrics, routes=app.router.routes)
    # registration order is the old single module's (it is the order of /openapi.json)
    add_probe_routes(app, models)
    add_admin_routes(app, models, fleet)
    add_model_admin_routes(app, models, loader, config, metrics)
    add_metrics_route(app, metrics)
    server = Server(models, config, metrics, idle)
    uploads = files or LocalFiles(FileStore(config.files))
    add_openai_routes(app, server, uploads)
    add_responses_routes(app, server, responses or LocalResponses(ResponseStore(config.responses)), uploads)
    add_messages_routes(app, server, uploads)
    add_files_routes(app, uploads, config.files)
    return app
