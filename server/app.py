"""The Starlette application: routes and the lifespan that starts and stops the parts."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.config import Config
from server.inference.api import Executor, ExecutorState

log = logging.getLogger("vlbridge.server")


def create_app(config: Config, executor: Executor) -> Starlette:
    async def health(request: Request) -> Response:
        stats = executor.stats()
        status = {
            ExecutorState.LOADING: "loading",
            ExecutorState.READY: "healthy",
            ExecutorState.FAILED: "unhealthy",
            ExecutorState.STOPPED: "unhealthy",
        }[stats.state]
        body = {
            "status": status,
            "weight": round(100 * (1 - stats.load)) if status == "healthy" else 0,
            "model": stats.model,
            "progress": round(stats.load_progress, 3),
            "queue_depth": stats.queue_depth,
            "active": stats.active,
        }
        return JSONResponse(body, status_code=200 if status == "healthy" else 503)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await executor.start()
        try:
            yield
        finally:
            await executor.stop(config.server.shutdown_grace)

    return Starlette(routes=[Route("/health", health)], lifespan=lifespan)
