"""Serving an ASGI app with uvicorn (uvloop, httptools) on its own thread, so the hosting process (the router
actor) keeps its own threads for Ray calls.

Lifecycle: `start()` runs the server thread and returns the URL once uvicorn is listening (RuntimeError if it does
not within `start_timeout_s`); the app's lifespan runs on that thread's event loop.  `stop()` asks uvicorn to
exit (the lifespan's shutdown runs) and joins the thread for at most `stop_timeout_s`.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HttpServer:
    def __init__(
        self, app: ASGIApp, host: str, port: int, start_timeout_s: float = 30.0, stop_timeout_s: float = 10.0
    ) -> None:
        """`port` 0: pick a free one now (the launcher picks one up front so a restarted router keeps it)."""
        port = port or free_port(host)
        self.url = f"http://{host}:{port}"
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
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
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=self.stop_timeout_s)
