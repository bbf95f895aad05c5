"""Errors to HTTP, in one table: every :class:`~cluster.errors.ClusterError` a route raises
becomes OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the status of its
kind. The admin API, the CLI's messages and the metrics' status labels use the same table.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.errors import (
    ClusterError,
    EngineFailed,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RateLimitState,
    TokensRateLimited,
    Unauthenticated,
    Unavailable,
    fmt_wait,
)

log = logging.getLogger(__name__)


class RouteNotFound(NotFound):
    """No route at this path (Starlette's 404)."""


class MethodNotAllowed(ClusterError):
    code = "method_not_allowed"


# kind -> (HTTP status, OpenAI error type); the most specific class in an error's MRO wins.
HTTP: dict[type[ClusterError], tuple[int, str]] = {
    ClusterError: (500, "internal_error"),
    InvalidRequest: (400, "invalid_request_error"),
    Unauthenticated: (401, "invalid_request_error"),
    Forbidden: (403, "invalid_request_error"),
    NotFound: (404, "invalid_request_error"),
    RouteNotFound: (404, "not_found_error"),
    MethodNotAllowed: (405, "invalid_request_error"),
    RateLimited: (429, "rate_limit_exceeded"),
    TokensRateLimited: (429, "tokens"),  # OpenAI's type for TPM refusals
    QuotaExceeded: (429, "insufficient_quota"),  # OpenAI's shape for a spent quota
    Unavailable: (503, "service_unavailable"),
    EngineFailed: (500, "internal_error"),
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape, which every 4xx and 5xx of this API has."""

    error: ErrorDetail


WHEN = {400: "Invalid request: a field, its range, or what the model can hold",
        401: "No valid key", 403: "The key or user may not do this",
        404: "No such model, endpoint or resource", 429: "A limit was reached",
        503: "A dependency cannot serve now; retry after Retry-After"}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of these error statuses, in OpenAI's shape."""
    return {s: {"model": ErrorBody, "description": WHEN[s]} for s in statuses}


def http_of(error: ClusterError) -> tuple[int, str]:
    for kind in type(error).__mro__:
        if kind in HTTP:
            return HTTP[kind]
    raise AssertionError("ClusterError is in the table")


def status_of(error: ClusterError) -> int:
    return http_of(error)[0]


def error_body(error: ClusterError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": http_of(error)[1],
                      "param": error.param, "code": error.code}}


def rate_headers(rate: RateLimitState | None) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, for limits that exist."""
    if rate is None:
        return {}
    out: dict[str, str] = {}
    for kind, limit, remaining, reset in (
            ("requests", rate.limit_requests, rate.remaining_requests, rate.reset_requests_ms),
            ("tokens", rate.limit_tokens, rate.remaining_tokens, rate.reset_tokens_ms)):
        if limit >= 0:
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            out[f"x-ratelimit-reset-{kind}"] = fmt_wait(reset)
    return out


def error_headers(error: ClusterError) -> dict[str, str]:
    headers = rate_headers(error.rate)
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    if error.should_retry is not None:
        headers["x-should-retry"] = "true" if error.should_retry else "false"
    return headers


def error_response(error: ClusterError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=status_of(error),
                        headers=error_headers(error))


def error_event(error: ClusterError) -> bytes:
    """The error as a mid-stream SSE event (the openai SDK raises on it)."""
    return f"data: {json.dumps(error_body(error))}\n\n".encode()


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # pydantic names union members ("function-after[...]", "str"): drop those
    parts = [p for p in parts if not (p.startswith(("function-", "tagged-union", "union["))
                                      or p in ("str", "int", "float", "list[...]"))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"We could not parse the JSON body of your request: "
                              f"{first.get('msg')}", code="invalid_json")
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if param:
        msg = f"Invalid value for '{param}': {msg}"
    return InvalidRequest(msg, param=param, code="invalid_value")


def _http_error(exc: StarletteHTTPException) -> ClusterError:
    if exc.status_code == 404:
        return RouteNotFound(str(exc.detail))
    if exc.status_code == 405:
        return MethodNotAllowed(str(exc.detail))
    return InvalidRequest(str(exc.detail), code="http_error")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first
    route's, and one path may have a route per method)."""
    path = request.url.path
    methods: set[str] = set()
    for route in request.app.routes:
        regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and route_methods and regex.match(path):
            methods |= set(route_methods)
    return sorted(methods)


OnInvalid = Callable[[Request, InvalidRequest], Awaitable[None]]


def install_error_handlers(app: FastAPI, on_invalid: OnInvalid | None = None) -> None:
    """Render every error through the table; ``on_invalid`` sees each request that failed
    validation (to count it against its key and user)."""

    @app.exception_handler(ClusterError)
    async def _domain(_: Request, exc: ClusterError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        if on_invalid is not None:
            await on_invalid(request, error)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(_http_error(exc))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(EngineFailed("The server had an error while processing your "
                                           "request."))
