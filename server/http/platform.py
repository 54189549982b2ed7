"""Mounting the IM platforms' framework-neutral endpoints (`server.platform.HttpRoute`) on Starlette.

The thin adapter between the web framework and the platform side: the request becomes an
`HttpRequest` whose body is read through the shared bounded reader (`server.http.body`), and
the handler's `HttpResponse` becomes a Starlette response (a `RequestError` it raises, the
project's JSON error). The platform code never sees
Starlette.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.errors import RequestError
from server.http.body import read_body
from server.http.errors import from_request_error
from server.platform import HttpRequest, HttpRoute


def mount(route: HttpRoute) -> Route:
    async def endpoint(request: Request) -> Response:
        async def body(limit: int) -> bytes:
            return await read_body(request, limit)

        neutral = HttpRequest(
            method=request.method,
            path=request.url.path,
            headers=request.headers,
            client=request.client.host if request.client else "?",
            read_body=body,
        )
        try:
            answer = await route.handler(neutral)
        except RequestError as exc:  # e.g. the body limit, when the handler lets it through
            return from_request_error(exc, route.path)
        return Response(answer.body, status_code=answer.status, media_type=answer.content_type)

    return Route(route.path, endpoint, methods=[route.method])
