"""Glue between Starlette and the route logic: faults, auth, JSON in and out, call records.

Every HTTP route of the fake goes through ``Endpoints.route``, so each one honours injected faults,
checks ``Authorization: Bearer <tenant token>`` when it must, answers errors in the platform's
envelope ``{"code", "msg", "data": {}}`` and is recorded as an ``ApiCall``.

Header names are written in canonical case on purpose: lark-oapi copies ``requests``' headers into a
plain dict and looks up ``Content-Type`` / ``Content-Disposition`` case-sensitively.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute

from . import codes
from .codes import ApiError
from .faults import FaultPlan, Route
from .records import ApiCall, Records
from .state import PlatformState

log = logging.getLogger("fakefeishu.http")


def canonical_response(body: bytes, status: int, headers: Sequence[tuple[str, str]]) -> Response:
    """A response whose header names reach the wire exactly as given (uvicorn h11 keeps case)."""
    response = Response(body, status_code=status)
    response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    response.raw_headers.append((b"Content-Length", str(len(body)).encode("latin-1")))
    return response


def json_response(payload: Mapping[str, Any], status: int = 200) -> Response:
    body = json.dumps(payload, ensure_ascii=False).encode()
    return canonical_response(
        body,
        status,
        [
            ("Content-Type", "application/json; charset=utf-8"),
            ("X-Tt-Logid", f"fake{secrets.token_hex(12)}"),
        ],
    )


def binary_response(data: bytes, content_type: str, file_name: str) -> Response:
    return canonical_response(
        data,
        200,
        [
            ("Content-Type", content_type),
            ("Content-Disposition", f'attachment; filename="{file_name}"'),
            ("X-Tt-Logid", f"fake{secrets.token_hex(12)}"),
        ],
    )


def ok(data: Mapping[str, Any] | None = None, msg: str = "success") -> Response:
    return json_response({"code": codes.OK, "msg": msg, "data": dict(data or {})})


@dataclass(frozen=True)
class ApiRequest:
    """What a handler gets: path params, query, parsed JSON body (None for GET/DELETE), token."""

    method: str
    host: str  # host:port the client addressed
    path: str
    path_params: Mapping[str, str]
    query: Mapping[str, str]
    body: Any
    token: str | None


Handler = Callable[[ApiRequest], Response]


class Endpoints:
    """Builds Starlette routes that share one state, record store and fault plan."""

    def __init__(self, state: PlatformState, records: Records, faults: FaultPlan) -> None:
        self.state = state
        self.records = records
        self.faults = faults

    def route(
        self, method: str, path: str, route: Route, handler: Handler, *, auth: bool = True
    ) -> StarletteRoute:
        async def endpoint(request: Request) -> Response:
            return await self._serve(request, route, handler, auth)

        endpoint.__name__ = route.value.replace(".", "_")
        return StarletteRoute(path, endpoint, methods=[method])

    async def _serve(self, request: Request, route: Route, handler: Handler, auth: bool) -> Response:
        fault = self.faults.take(route)
        if fault is not None and fault.delay_s > 0:
            await asyncio.sleep(fault.delay_s)
        code = codes.OK
        try:
            if fault is not None and fault.code is not None:
                raise ApiError(fault.code, fault.msg, fault.status)
            token = self.state.check_token(request.headers.get("Authorization")) if auth else None
            body = await _json_body(request) if request.method in ("POST", "PUT", "PATCH") else None
            api_request = ApiRequest(
                method=request.method,
                host=request.url.netloc,
                path=request.url.path,
                path_params=dict(request.path_params),
                query=dict(request.query_params),
                body=body,
                token=token,
            )
            response = handler(api_request)
        except ApiError as exc:
            code = exc.code
            log.info("%s %s -> %s %s", request.method, request.url.path, exc.code, exc.msg)
            response = json_response({"code": exc.code, "msg": exc.msg, "data": {}}, exc.status)
        with self.records.mutate() as t:
            t.api_calls.append(
                ApiCall(
                    route=route.value,
                    method=request.method,
                    path=request.url.path,
                    status=response.status_code,
                    code=code,
                )
            )
        return response


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(codes.FIELD_VALIDATION_FAILED, f"request body is not JSON: {exc}") from exc


def require(body: Any, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """``body[key]`` if present with the right type, else the platform's field-validation error."""
    if not isinstance(body, dict) or key not in body or not isinstance(body[key], kind):
        raise ApiError(codes.FIELD_VALIDATION_FAILED, f"field validation failed: {key}")
    return body[key]
