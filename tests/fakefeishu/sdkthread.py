"""Run an unmodified ``lark_oapi.ws.Client`` in a daemon thread of its own, and stop it again.

The SDK module grabs one event loop at import and ``start()`` blocks forever with no stop. So: a
fresh loop per thread, assigned to ``lark_oapi.ws.client.loop`` BEFORE the client is constructed in
that thread (its constructor creates a task on the current loop). ``stop()`` cancels every task on
that loop, repeatedly, until ``start()`` gives up, then closes the socket the SDK holds (its private
``_conn``: there is no public way) so the server sees the disconnect, and closes the loop.

Only one such thread at a time per process: the SDK's loop is a module global.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Any

import lark_oapi as lark
import lark_oapi.ws.client as ws_client_module

from ..waiting import DEADLINE

log = logging.getLogger("fakefeishu.sdkthread")


class LarkWsThread:
    """``lark.ws.Client(app_id, app_secret, event_handler=..., domain=...)`` in its own thread.

    ``error`` holds what ``start()`` raised (e.g. a ``ClientException`` from a non-retryable
    discovery code on the first connect); None while running or after a clean stop.
    """

    def __init__(
        self,
        *,
        app_id: str,
        app_secret: str,
        domain: str,
        event_handler: Any,
        log_level: lark.LogLevel = lark.LogLevel.WARNING,
        auto_reconnect: bool = True,
    ) -> None:
        self._kwargs = {
            "app_id": app_id,
            "app_secret": app_secret,
            "domain": domain,
            "event_handler": event_handler,
            "log_level": log_level,
            "auto_reconnect": auto_reconnect,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping = False
        self._finished = False  # set on the SDK thread once start() has returned
        self.client: lark.ws.Client | None = None
        self.error: BaseException | None = None

    def start(self, timeout: float = DEADLINE) -> LarkWsThread:
        """Start the thread; returns once the client is constructed (not yet connected)."""
        if self._thread is not None:
            raise RuntimeError("expected a fresh LarkWsThread, got one already started")
        self._thread = threading.Thread(target=self._run, name="lark-ws-client", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("lark ws client thread did not start")
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def coroutines(self, timeout: float = DEADLINE) -> list[str]:
        """Qualified names of the coroutines still running on the SDK's loop, read on that loop
        (e.g. ``Client._receive_message_loop``: the task that reconnects after a drop, and that
        ends when the SDK gives up). Empty once the loop is gone. Not to be called while holding
        a lock that the fake's server thread needs: the SDK's loop may be waiting on that server."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return []
        names: concurrent.futures.Future[list[str]] = concurrent.futures.Future()

        def collect() -> None:
            names.set_result(
                sorted(getattr(task.get_coro(), "__qualname__", "?") for task in asyncio.all_tasks(loop))
            )

        try:
            loop.call_soon_threadsafe(collect)
        except RuntimeError:  # closed meanwhile
            return []
        return names.result(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        previous = ws_client_module.loop
        ws_client_module.loop = loop
        self._loop = loop
        try:
            self.client = lark.ws.Client(**self._kwargs)
            self._started.set()
            self.client.start()
        except asyncio.CancelledError:
            pass  # stop() cancelled the SDK's tasks: the normal way out
        except BaseException as exc:
            self.error = exc
            if not self._stopping:
                log.info("lark ws client stopped by itself: %r", exc)
        finally:
            self._finished = True
            self._started.set()
            self._close(loop)
            ws_client_module.loop = previous

    def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = time.monotonic() + 3
        while (tasks := asyncio.all_tasks(loop)) and time.monotonic() < deadline:
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.wait(tasks, timeout=0.1))
        conn = getattr(self.client, "_conn", None)
        if conn is not None:
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.wait_for(conn.close(), 2))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the client and wait for its thread to end; safe to call twice."""
        if self._thread is None or not self._thread.is_alive() or self._loop is None:
            return
        self._stopping = True
        loop = self._loop

        def cancel_all() -> None:
            if self._finished:  # start() is out; _close() owns the loop now
                return
            for task in asyncio.all_tasks(loop):
                task.cancel()
            # start() may be between two run_until_complete calls; keep cancelling until it is out.
            loop.call_later(0.05, cancel_all)

        with contextlib.suppress(RuntimeError):  # loop already closed: the thread is ending
            loop.call_soon_threadsafe(cancel_all)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"lark ws client thread did not stop within {timeout}s")
