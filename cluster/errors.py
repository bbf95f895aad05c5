"""OpenAI-style errors, and their mapping to HTTP in one place.

Every failure a client can see is an :class:`APIError` (or is turned into one by the
handlers installed with :func:`install_error_handlers`), rendered as
``{"error": {"message", "type", "param", "code"}}`` with the matching status.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, status_code: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        if status_code is not None:
            self.status_code = status_code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)

    def sse(self) -> str:
        """The error as a mid-stream SSE event (the openai SDK raises on it)."""
        return f"data: {json.dumps(self.body())}\n\n"


class InvalidRequest(APIError):
    status_code = 400
    code = "invalid_request"


class AuthenticationFailed(APIError):
    status_code = 401
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status_code = 403
    code = "permission_denied"


class ModelNotFound(APIError):
    status_code = 404
    code = "model_not_found"


class RateLimited(APIError):
    status_code = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class ServiceUnavailable(APIError):
    status_code = 503
    type = "service_unavailable"
    code = "service_unavailable"


class EngineError(APIError):
    status_code = 500
    type = "internal_error"
    code = "internal_error"


def from_error_body(body: Mapping[str, Any], status_code: int) -> APIError:
    """Rebuild an APIError from an engine's error object (vLLM's ``ErrorResponse``)."""
    err = body.get("error", body)
    status = int(err.get("code") if isinstance(err.get("code"), int) else status_code)
    kind = str(err.get("type") or "invalid_request_error")
    if status == 404 or kind == "NotFoundError":
        return ModelNotFound(str(err.get("message", "not found")), param="model")
    if status >= 500:
        return EngineError(str(err.get("message", "engine error")))
    return InvalidRequest(str(err.get("message", "invalid request")), param=err.get("param"))


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # pydantic names union members ("function-after[...]", "str"): drop those
    parts = [p for p in parts if not (p.startswith(("function-", "tagged-union", "union["))
                                      or p in ("str", "int", "float", "list[...]"))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"We could not parse the JSON body of your request: "
                              f"{first.get('msg')}", code="invalid_json")
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if param:
        msg = f"Invalid value for '{param}': {msg}"
    return InvalidRequest(msg, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: ("not_found", "not_found_error"),
                 405: ("method_not_allowed", "invalid_request_error")}
        code, kind = kinds.get(exc.status_code, ("http_error", "invalid_request_error"))
        return APIError(str(exc.detail), code=code, type=kind,
                        status_code=exc.status_code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return EngineError("The server had an error while processing your request.").response()
