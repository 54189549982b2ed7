"""The Starlette application: routes, and the lifespan that starts and stops the service."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from server import metrics, testpage
from server.answers import AnswerGateway
from server.config import Config
from server.http.analyze import analyze
from server.http.common import HttpContext
from server.http.errors import http_exception
from server.http.openai import chat_completions, models
from server.http.platform import mount
from server.inference.api import Executor
from server.platform import PlatformAdapter
from server.service import Service
from server.ws.endpoint import websocket_endpoint

log = logging.getLogger("vlbridge.server")

WS_PATH = "/ws"


async def health(request: Request) -> Response:
    service: Service = request.app.state.service
    body, status = service.health()
    return JSONResponse(body, status_code=status)


async def metrics_endpoint(request: Request) -> Response:
    service: Service = request.app.state.service
    return Response(service.metrics_text(), media_type=metrics.CONTENT_TYPE)


class App(Starlette):
    """Starlette, with the `/ws` handshake handed straight to its endpoint.

    An idle WebSocket session keeps its whole call chain alive for hours; Starlette's
    middleware and routing layers (which do nothing for this route) cost ~5 KiB of
    coroutine frames per session, a sixth of the budget for an idle one.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            scope["app"] = self
            await websocket_endpoint(WebSocket(scope, receive, send), send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    config: Config, answers: AnswerGateway | Executor, platforms: Sequence[PlatformAdapter] = ()
) -> Starlette:
    """The app; the service (app.state.service) starts and stops with the lifespan. Given an
    executor, the service puts its own answer gateway in front of it; platform adapters must
    have been given that gateway (`AnswerGateway.route`) to be drained and counted with it."""
    service = Service(config, answers, platforms)
    routes: list[BaseRoute] = [
        Route("/health", health),
        Route("/metrics", metrics_endpoint),
        WebSocketRoute(WS_PATH, websocket_endpoint),  # reached through App.__call__'s shortcut
        Route("/v1/analyze", analyze, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models),
        *testpage.routes(config),  # the browser test page at /, unless server.test_page = false
    ]
    for adapter in platforms:
        routes.extend(mount(route) for route in adapter.routes())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await service.start()
        except BaseException:
            await service.stop()
            raise
        try:
            yield
        finally:
            await service.stop()

    app = App(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_exception})
    app.state.service = service
    app.state.hub = service.hub  # what /ws connections need
    # what HTTP routes need
    app.state.http = HttpContext(service.answers, service.auth, config.server, service.image_limits)
    return app
