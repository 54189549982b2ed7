"""A real uvicorn server on a free loopback port, in a thread with its own event loop.

Tests talk to it over real sockets (websockets, httpx, the openai client). `serve()`
stops it the way SIGTERM does (uvicorn's `should_exit`), through vlbridge's drain.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from server.app import create_app
from server.backend import build_executor
from server.config import Config, ExecutorConfig, ModelConfig, ServerConfig
from server.inference.api import Executor
from server.inference.echo import ECHO_PATH, EchoEngine
from server.inference.executor import ExecutorLimits, InferenceExecutor
from server.platform import PlatformAdapter
from server.service import Service
from server.webserver import Server, uvicorn_config

FAST = {"ping_interval": 5.0, "ping_timeout": 5.0, "shutdown_grace": 2.0}


def make_config(model_path: str = ECHO_PATH, executor: dict[str, Any] | None = None, **server: Any) -> Config:
    return Config(
        server=ServerConfig(**{**FAST, **server}),
        model=ModelConfig(path=model_path, max_new_tokens=64),
        executor=ExecutorConfig(**(executor or {})),
    )


def slow_echo(step_delay: float = 0.02, max_batch: int = 8) -> InferenceExecutor:
    """The real executor over the echo engine, one character every *step_delay* seconds."""
    return InferenceExecutor(
        lambda progress: EchoEngine(step_delay=step_delay),
        ExecutorLimits(max_batch=max_batch, queue_size=64, max_new_tokens=512),
        model_name="slow-echo",
    )


@dataclass
class Running:
    server: Server
    thread: threading.Thread
    port: int

    @property
    def service(self) -> Service:
        return self.server.service

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def stop(self, timeout: float = 30.0) -> float:
        """Ask the server to exit as on SIGTERM; return the seconds it took."""
        started = time.monotonic()
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop in time"
        return time.monotonic() - started


@contextlib.contextmanager
def serve(
    config: Config,
    executor: Executor | None = None,
    platforms: Sequence[PlatformAdapter] = (),
    ready: bool = True,
    **uvicorn: Any,
) -> Iterator[Running]:
    app = create_app(config, executor or build_executor(config), platforms)
    options = uvicorn_config(app, config, host="127.0.0.1", port=0, log_level="warning", **uvicorn)
    server = Server(options, app.state.service)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "the server failed to start"
        assert time.monotonic() < deadline, "the server did not start in time"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    running = Running(server, thread, port)
    if ready:
        while app.state.service.answers.stats().state.value == "loading":
            assert time.monotonic() < deadline, "the model did not load in time"
            time.sleep(0.02)
    try:
        yield running
    finally:
        if thread.is_alive():
            running.stop()
