"""Runs an ASGI app with uvicorn on 127.0.0.1 in a background thread with its own event loop.

The thread owns the loop; other threads hand work to it with ``call`` / ``call_async``. The port is
chosen by the OS at ``start()``. uvicorn is pinned to its ``h11`` HTTP protocol because that one
writes response header names in the case the app gave them (lark-oapi needs ``Content-Type``), and to
the ``websockets-sansio`` WebSocket protocol. Logging is left to the test process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import uvicorn

log = logging.getLogger("fakefeishu.server")

T = TypeVar("T")


class ServerThread:
    """One uvicorn server in one daemon thread; ``start()`` returns once it accepts connections."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        self._app = app
        self._host = host
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            raise RuntimeError("expected a stopped server, got one already started")
        # proto must say TCP: asyncio only disables Nagle (TCP_NODELAY) on sockets whose proto is
        # IPPROTO_TCP, and with Nagle on, back-to-back frames (a split event) stall ~40 ms.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            http="h11",
            ws="websockets-sansio",
            lifespan="off",
            log_config=None,
            access_log=False,
            ws_ping_interval=None,
            ws_ping_timeout=None,
            ws_per_message_deflate=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"fakefeishu-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"fake server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake server did not start within {timeout}s")
            time.sleep(0.005)

    def _run(self, sock: socket.socket) -> None:
        assert self._server is not None
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._server.serve(sockets=[sock]))
        except BaseException as exc:  # keep it for start()/stop() instead of dying silently
            self._error = exc
            log.exception("fake server thread failed")
        finally:
            sock.close()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, fn: Callable[[], T], timeout: float = 5.0) -> T:
        """Run ``fn()`` on the server loop and return its result (directly when already on it)."""
        loop = self._require_loop()
        if threading.current_thread() is self._thread:
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def call_async(self, make: Callable[[], Awaitable[T]], timeout: float = 5.0) -> T:
        """Run a coroutine on the server loop from another thread and wait for its result."""
        loop = self._require_loop()
        if threading.current_thread() is self._thread:
            raise RuntimeError("expected a call from outside the server thread")

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None or self._server is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("fake server thread did not stop within %ss", timeout)
        self._thread = None

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or not self.running:
            raise RuntimeError("expected a running fake server, got none (call start() first)")
        return self._loop
