"""The router service: RouterCore + the FastAPI app served by uvicorn (uvloop) on its own thread, and the health
supervisor running on that same event loop.

Hosted inside the router Ray actor (see cluster/actors.py); Ray-agnostic itself apart from the worker handles
it is given, so tests can also run it in-process.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from disagg.engine.model import ModelConfig
from disagg.engine.tokenizer import Tokenizer
from disagg.planner.loop import PlannerLoop
from disagg.planner.policy import PlannerConfig
from disagg.protocol import KVEventBatch
from disagg.router.admission import AdmissionConfig, CapacityConfig
from disagg.router.api import ApiConfig, build_app
from disagg.router.handles import WorkerHandle
from disagg.router.health import HealthConfig
from disagg.router.policy import PolicyConfig
from disagg.router.router import RouterCore, RouterCoreConfig
from disagg.tracing import TracingConfig, make_tracer


@dataclass
class RouterConfig:
    model: str  # model directory (tokenizer, chat template, context length)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: pick a free port (the launcher picks one up front so a restart keeps it)
    policy: dict[str, Any] = field(default_factory=dict)  # PolicyConfig fields
    core: dict[str, Any] = field(default_factory=dict)  # RouterCoreConfig fields (deadlines, migrations)
    health: dict[str, Any] = field(default_factory=dict)  # HealthConfig fields
    block_size: int = 16
    max_model_len: int = 2048
    served_model_name: str = ""  # "" = the model directory's name
    api_key: str | None = None
    api_keys: dict[str, str] | None = None  # key -> tenant (several keys, one tenant each)
    admission: dict[str, Any] = field(default_factory=dict)  # AdmissionConfig fields (limits, deadlines, weights)
    capacity: dict[str, Any] = field(default_factory=dict)  # CapacityConfig fields (saturation thresholds)
    tracing: dict[str, Any] = field(default_factory=dict)  # TracingConfig fields (OTLP endpoint, sampling)
    planner: dict[str, Any] = field(default_factory=dict)  # PlannerConfig fields (enabled, SLOs, hysteresis)
    start_timeout_s: float = 30.0
    stop_timeout_s: float = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RouterServer:
    def __init__(self, config: RouterConfig, prefill: dict[str, WorkerHandle], decode: dict[str, WorkerHandle]) -> None:
        self.config = config
        model_dir = Path(config.model)
        tokenizer = Tokenizer.from_dir(model_dir)
        max_len = min(config.max_model_len, ModelConfig.from_dir(model_dir).max_position_embeddings)
        self.core = RouterCore(
            prefill,
            decode,
            PolicyConfig(**config.policy),
            config.block_size,
            RouterCoreConfig(**config.core),
            HealthConfig(**config.health),
            AdmissionConfig(**config.admission),
            CapacityConfig(**config.capacity),
            make_tracer(TracingConfig(**config.tracing), "router"),
        )
        self.core.planner = PlannerLoop(self.core, PlannerConfig(**config.planner))
        name = config.served_model_name or model_dir.name
        self.app = build_app(self.core, tokenizer, ApiConfig(name, max_len, config.api_key, config.api_keys))
        port = config.port or free_port(config.host)
        self.url = f"http://{config.host}:{port}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=config.host,
                port=port,
                loop="uvloop",
                http="httptools",
                log_level="warning",
                access_log=False,
            )
        )
        self._thread = threading.Thread(target=self._server.run, name="router-http", daemon=True)

    def start(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self.config.start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def publish_kv_events(self, batch: bytes) -> bool:
        return self.core.on_kv_events(KVEventBatch.from_wire(batch))

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=self.config.stop_timeout_s)
