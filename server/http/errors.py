"""HTTP errors: one JSON shape, ``{"error": {"code", "message"}}``, with the right status.

The `type` field repeats the code so that OpenAI clients, which read `error.type`, show
something sensible. `busy` and `unavailable` carry ``Retry-After``.
"""

from __future__ import annotations

import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from server import metrics
from server.errors import RequestError

log = logging.getLogger("vlbridge.http")

STATUS = {
    "bad_request": 400,
    "bad_image": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "too_large": 413,
    "unsupported_media_type": 415,
    "busy": 429,
    "cancelled": 499,
    "internal": 500,
    "unavailable": 503,
    "timeout": 504,
}
_BY_STATUS = {status: code for code, status in STATUS.items() if code != "bad_image"}


def error_response(
    code: str, message: str, *, retry_after: float | None = None, route: str | None = None
) -> JSONResponse:
    """The error answer; with *route* (a metrics label, see `route_of`) the request is counted
    (`server.metrics.count`). Leave *route* out for a request the answer gateway counted
    already (it was submitted)."""
    if route is not None:
        metrics.count(route, code)
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse(error_body(code, message), STATUS.get(code, 500), headers=headers)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The error shape every HTTP error answer has."""
    return {"error": {"code": code, "message": message, "type": code}}


def from_request_error(exc: RequestError, route: str | None = None) -> JSONResponse:
    return error_response(exc.code, exc.message, retry_after=exc.retry_after, route=route)


def route_of(request: HTTPConnection) -> str:
    """The metrics label of *request*'s route: the path template of the Starlette route it
    matched (Starlette's router puts it in the scope, for a 405 too), else `metrics.UNMATCHED`:
    every URL a scanner tries must not become a series of its own."""
    path = getattr(request.scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else metrics.UNMATCHED


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405/... as JSON errors."""
    assert isinstance(exc, HTTPException)
    code = _BY_STATUS.get(exc.status_code, "bad_request")
    return error_response(code, str(exc.detail), route=route_of(request))


def unauthorized(route: str | None = None) -> JSONResponse:
    response = error_response(
        "unauthorized",
        "a valid token is required: Authorization: Bearer <token> (or ?token=<token>)",
        route=route,
    )
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def forbidden_origin(request: HTTPConnection) -> JSONResponse:
    """403 for a browser request from a site that is not allowed (server.auth), logged."""
    origin = request.headers.get("origin", "")[:200]
    log.warning(
        "%s %s from origin %r refused (not allowed, no token)",
        request.scope.get("method"),
        request.url.path,
        origin,
    )
    return error_response(
        "forbidden", f"origin {origin!r} is not allowed; see server.allowed_origins", route=route_of(request)
    )
