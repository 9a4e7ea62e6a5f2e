"""The router's composition root: from a RouterConfig (a wire message, so Ray can restart the router actor
with its constructor arguments) and the workers' handles, build the routing core (router/), the planner loop over its
port (planner/, router/planner_port.py), the HTTP front door (http/app.py) and the server it runs on
(http/server.py).

Lifecycle: `start()` serves HTTP and returns the URL; the app's lifespan starts the core's background tasks on
the server's event loop (admission, health supervisor, planner) and stops them when `stop()` ends the server.
Ray-agnostic itself apart from the worker handles it is given (cluster/router_actor.py hosts it in an actor), so
tests can also run it in-process.  Imports no torch: the router process serves HTTP, not a model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from disagg.cluster.worker_config import WorkerConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.heap import settle_heap
from disagg.http.app import build_app
from disagg.http.config import AgentConfig, ApiConfig, ApiKey, IdleConfig, check_exposure
from disagg.http.file_store import FileStoreConfig, FileStorePort
from disagg.http.fleet_port import TableFleetPort
from disagg.http.models import ModelLoader, ModelTable, ServedModel
from disagg.http.response_store import ResponseStoreConfig, ResponseStorePort
from disagg.http.server import HttpServer
from disagg.isolation import IsolationConfig
from disagg.planner.fleet import FleetConfig
from disagg.planner.fleet_loop import FleetLoop
from disagg.planner.loop import PlannerLoop
from disagg.planner.policy import PlannerConfig
from disagg.protocol import LoRARef
from disagg.router.admission import AdmissionConfig, CapacityConfig
from disagg.router.core_config import RouterCoreConfig
from disagg.router.handles import WorkerHandle
from disagg.router.health import HealthConfig
from disagg.router.planner_port import RouterPlannerPort
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore
from disagg.router.watch import SilentConfig
from disagg.tracing import TracingConfig, make_tracer
from disagg.vision.images import ImageLimits
from disagg.vision.spec import VisionSpec
from disagg.vision.stage import EncodeConfig, EncoderPort, EncodeStage
from disagg.wire import WireMessage

DEFAULT_MAX_POSITION_EMBEDDINGS = 4096  # what the engine assumes when config.json does not say (engine/model.py)


@dataclass
class ModelRoute:
    """One model of a multi-model deployment as the router serves it: its served name, directory, its workers'
    names and the engine settings the router mirrors (the launcher fills it: cluster/launch.py)."""

    name: str
    model: str  # model directory (tokenizer, chat template, context length)
    block_size: int
    max_model_len: int
    prefill: list[str]
    decode: list[str]
    namespace: str = ""  # block-hash namespace (isolation.model_salted); "": unsalted
    aliases: list[str] = field(default_factory=list)  # names that send all their requests to this model
    adapters: list[LoRARef] = field(default_factory=list)  # LoRA adapters, each served as a model of its own
    standby: list[str] = field(default_factory=list)  # decode workers started asleep: parked (router/parking.py)
    encoders: list[str] = field(default_factory=list)  # its encoder workers (E/PD; a VLM's)


@dataclass
class RouterConfig(WireMessage):
    """The router's settings; its Ray actor gets them as this message's bytes (cluster/router_actor.py)."""

    TYPE: ClassVar[str] = "router_config"
    model: str = ""  # model directory (tokenizer, chat template, context length); the launcher sets the cluster's
    host: str = field(default="127.0.0.1", metadata={"help": "address the OpenAI-compatible endpoint binds"})
    # 0: a free port (the launcher picks it up front, so a restarted router binds the same one)
    port: int = field(default=0, metadata={"help": "port of the OpenAI-compatible endpoint (0: a free one)"})
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    core: RouterCoreConfig = field(default_factory=RouterCoreConfig)  # deadlines, migrations
    health: HealthConfig = field(default_factory=HealthConfig)
    silent: SilentConfig = field(default_factory=SilentConfig)  # canaries, gray failures (off by default)
    block_size: int = 16  # the launcher sets the engine's
    max_model_len: int = 2048  # the launcher sets the engine's
    served_model_name: str = ""  # "" = the model directory's name
    api_key: str | None = field(  # the operator's key: admin scope, any priority (http/config.py)
        default=None, metadata={"help": "the operator's key: 'Authorization: Bearer KEY' on /v1/* and /admin/*"}
    )
    api_keys: dict[str, str] | None = None  # key -> tenant (tenant keys: no admin, priority <= 0)
    keys: dict[str, ApiKey] | None = None  # key -> full grant (the keys file: http/keys.py)
    responses: ResponseStoreConfig = field(default_factory=ResponseStoreConfig)  # the Responses API's store
    files: FileStoreConfig = field(default_factory=FileStoreConfig)  # the Files API's uploads
    agents: AgentConfig = field(default_factory=AgentConfig)  # agent turns' KV retention
    idle: IdleConfig = field(default_factory=IdleConfig)  # models asleep when idle, woken by a request
    images: ImageLimits = field(default_factory=ImageLimits)  # image_url parts: sizes, counts, remote fetching
    encode: EncodeConfig = field(default_factory=EncodeConfig)  # which requests' images go to encoder workers
    encoders: list[str] = field(default_factory=list)  # the encoder workers' actor names (E/PD; each model's route
    # names its own)
    replicas: int = field(
        default=1, metadata={"help": "router replicas behind Ray Serve's HTTP proxy (2+: no single point of failure)"}
    )
    insecure: bool = field(
        default=False, metadata={"help": "serve a non-loopback --host without API keys (open to anyone who reaches it)"}
    )
    isolation: IsolationConfig = field(default_factory=IsolationConfig)  # tenant -> cache share group
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)  # limits, deadlines, weights
    capacity: CapacityConfig = field(default_factory=CapacityConfig)  # saturation thresholds
    tracing: TracingConfig | None = None  # OTLP endpoint, sampling; None: the cluster's (launcher), else no spans
    planner: PlannerConfig = field(default_factory=PlannerConfig)  # enabled, SLOs, hysteresis
    fleet: FleetConfig = field(default_factory=FleetConfig)  # workers moved between models (planner/fleet.py)
    start_timeout_s: float = 30.0
    stop_timeout_s: float = 10.0
    # a deployment of several models (models/deployment.py), each with its workers; empty: one model, the fields
    # `model`, `block_size`, `max_model_len` and `served_model_name` above, served by every worker given
    models: list[ModelRoute] = field(default_factory=list)
    # the workers' settings, so models can be loaded at run time (/admin/models: cluster/model_loader.py); None:
    # the deployment is fixed
    worker_template: WorkerConfig | None = None
    model_drain_timeout_s: float = 300.0  # an unloaded model's requests in flight may finish for this long
    # where the model table's run-time changes are kept for a restarted router (cluster/runtime_table.py; the
    # launcher names one per service); "": not kept
    runtime_key: str = ""

    def routes(self, prefill: list[str], decode: list[str]) -> list[ModelRoute]:
        """The models to serve: `models`, or the one model over the workers named."""
        if self.models:
            return self.models
        name = self.served_model_name or Path(self.model).name
        return [ModelRoute(name, self.model, self.block_size, self.max_model_len, list(prefill), list(decode))]

    def check_exposure(self) -> None:
        """InsecureExposure if this would serve a non-loopback host with no API key, and not --insecure."""
        check_exposure(self.host, bool(self.api_key or self.api_keys or self.keys), self.insecure)


def max_position_embeddings(model_dir: Path) -> int:
    """The model's context length from its HF config.json, read without the engine (which would load torch)."""
    path = model_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a model directory needs an HF config.json")
    return int(json.loads(path.read_text()).get("max_position_embeddings", DEFAULT_MAX_POSITION_EMBEDDINGS))


def serve_model(
    config: RouterConfig,
    route: ModelRoute,
    prefill: Mapping[str, WorkerHandle],
    decode: Mapping[str, WorkerHandle],
    encoders: Mapping[str, EncoderPort] | None = None,
) -> ServedModel:
    """One model's routing core (its own pools, index, admission, health, planner; not started) and its
    front-door entry; a VLM's images go through an encode stage over `encoders`, its own encoder workers (E/PD; none:
    encoded colocated)."""
    model_dir = Path(route.model)
    core = RouterCore(
        {n: prefill[n] for n in route.prefill if n in prefill},
        {n: decode[n] for n in route.decode if n in decode},
        config.policy,
        route.block_size,
        config.core,
        config.health,
        config.admission,
        config.capacity,
        make_tracer(config.tracing or TracingConfig(), "router"),
        silent=config.silent,
    )
    core.planner = PlannerLoop(RouterPlannerPort.of(core), config.planner)
    core.standby(route.standby)
    max_len = min(route.max_model_len, max_position_embeddings(model_dir))
    tokenizer = Tokenizer.from_dir(model_dir)
    vision = VisionSpec.from_dir(model_dir)
    served = ServedModel(route.name, core, tokenizer, max_len, route.namespace, model_dir=route.model, vision=vision)
    if vision is not None:
        health = core.health

        def usable(name: str) -> bool:  # an encoder that is a worker too (--encode-on-prefill): not while dead
            return name not in health.workers or not health.is_dead(name)

        served.encode = EncodeStage(encoders or {}, vision.hidden_size, config.encode, usable)
    return served


def _encoders_of(
    route: ModelRoute, encoders: Mapping[str, EncoderPort], config: RouterConfig
) -> dict[str, EncoderPort]:
    """The encoders of `route`'s model: those its route names in a deployment; with one model alone, all."""
    return {n: port for n, port in encoders.items() if not config.models or n in route.encoders}


class RouterService:
    def __init__(
        self,
        config: RouterConfig,
        prefill: dict[str, WorkerHandle],
        decode: dict[str, WorkerHandle],
        *,
        encoders: Mapping[str, EncoderPort] | None = None,
        serve_http: bool = True,
        responses: ResponseStorePort | None = None,
        files: FileStorePort | None = None,
        loader: ModelLoader | None = None,
    ) -> None:
        """`serve_http=False`: build the app only; its host serves it (a Ray Serve replica: cluster/replicas.py).
        `responses`, `files`: the Responses and Files APIs' stores when they are shared (replicas); None: in this
        process.  `loader`:
        starts and ends models' workers at run time (cluster/model_loader.py); None: the deployment is fixed."""
        self.config = config
        config.check_exposure()  # before anything starts
        # a model whose decode workers are all gone was unloaded before this (restarted) router started: not served
        routes = [r for r in config.routes(list(prefill), list(decode)) if any(n in decode for n in r.decode)]
        if not routes:
            raise ValueError("no model has a decode worker to serve it")
        given = encoders or {}  # each model's own encoders (one model alone: every encoder given)
        served = [serve_model(config, route, prefill, decode, _encoders_of(route, given, config)) for route in routes]
        self.models = ModelTable(served)
        for route, base in zip(routes, served):
            for ref in route.adapters:
                self.models.add(base.adapter(ref))
        for route in routes:
            for alias in route.aliases:
                self.models.aliases.set(alias, {route.name: 1.0}, self.models.ids())
        if loader is not None:  # a restarted router: the models, adapters and aliases changed at run time
            loader.restore(self.models)
        self.core = served[0].core  # the first (or only) model's: single-model tools and tests read it
        api = ApiConfig(
            config.api_key,
            config.api_keys,
            config.keys,
            isolation=config.isolation,
            responses=config.responses,
            files=config.files,
            agents=config.agents,
            model_drain_timeout_s=config.model_drain_timeout_s,
            idle=config.idle,
            images=config.images,
        )
        if config.idle.wakes and not serve_http:  # each replica would sleep and wake the models on its own
            raise ValueError("sleeping idle models and waking them on a request need a single router")
        self.fleet = FleetLoop(TableFleetPort(self.models, config.fleet), config.fleet)  # runs only when enabled
        self.app = build_app(self.models, api, responses, loader, self.fleet, files=files)
        self.http: HttpServer | None = None
        if serve_http:
            self.http = HttpServer(self.app, config.host, config.port, config.start_timeout_s, config.stop_timeout_s)
        settle_heap("router")  # what start-up built lives as long as the process: out of every full collection

    def start(self) -> str:
        if self.http is None:
            raise RuntimeError("this service's app is served by its host, not by the service")
        return self.http.start()

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
