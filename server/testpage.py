"""The browser test page: static HTML/JS/CSS from `server/static/`, served at `/`.

`routes(config)` returns the routes to mount, or none when `server.test_page = false`.
The page speaks protocol v1 to `/ws` on the same origin; when auth is on, index.html is
served with `data-auth="on"` so the page asks for a token (sent as `?token=`, since
browsers cannot set headers on a WebSocket handshake). Nothing is built or fetched from
elsewhere: the three files are the whole page.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from server.config import Config

STATIC = Path(__file__).with_name("static")
_NO_CACHE = {"Cache-Control": "no-cache"}


def routes(config: Config) -> list[BaseRoute]:
    if not config.server.test_page:
        return []
    auth = "on" if config.server.auth_tokens else "off"
    page = (
        (STATIC / "index.html").read_text(encoding="utf-8").replace('data-auth="off"', f'data-auth="{auth}"')
    )

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=_NO_CACHE)

    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
