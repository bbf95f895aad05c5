"""The OpenAI-compatible routes and the FastAPI app around them.

Routes stay thin: parsing and validation are the protocol models' job, admission the gate's,
routing and billing :class:`~cluster.serving.service.InferenceService`'s, errors
:mod:`cluster.api.errors`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sse_starlette import EventSourceResponse

from cluster.api import openapi
from cluster.api.errors import documented, install_error_handlers, rate_headers, status_of
from cluster.api.protocol import (
    MAX_USER_LENGTH,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from cluster.api.sse import stream_response
from cluster.errors import InvalidRequest
from cluster.serving.service import InferenceRequest, InferenceResponse, InferenceService

STARTED = int(time.time())


# Documented as the API's security scheme; a missing or malformed key is the gate's 401.
API_KEY = HTTPBearer(auto_error=False, scheme_name="apiKey",
                     description="An API key: `Authorization: Bearer sk-...`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(API_KEY)]
ERRORS = documented(400, 401, 403, 404, 429, 503)
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a chunk as JSON, an error object, or [DONE]"}}}


def streamed(model: type) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or SSE events when the request says `stream: true`."""
    return {200: {"model": model, "description": "The answer, or with `stream: true` its "
                  "chunks as server-sent events ending in `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": SSE_EVENT}}}} | ERRORS


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def model_list(service: InferenceService) -> ModelList:
    return ModelList(data=[
        ModelCard(id=s.id, created=STARTED, owned_by=s.id.split("/")[0],
                  context_length=s.engine.max_model_len, description=s.description,
                  pricing={"input_per_million": s.pricing.input_per_million,
                           "output_per_million": s.pricing.output_per_million,
                           "currency": "USD"},
                  endpoints=[e.path for e in s.endpoints], max_choices=s.max_choices)
        for s in service.specs.values()])


def openai_router(service: InferenceService) -> APIRouter:
    router = APIRouter()

    async def serve(body: InferenceRequest, credentials: HTTPAuthorizationCredentials | None
                    ) -> JSONResponse | EventSourceResponse:
        result = await service.create(body, credentials.credentials if credentials else None)
        if isinstance(result, InferenceResponse):
            return JSONResponse(result.body, headers=rate_headers(result.rate))
        return stream_response(result)

    @router.post("/chat/completions", response_model=None,
                 responses=streamed(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, credentials: Credentials
                               ) -> JSONResponse | EventSourceResponse:
        return await serve(body, credentials)

    @router.post("/completions", response_model=None, responses=streamed(CompletionResponse))
    async def completions(body: CompletionRequest, credentials: Credentials
                          ) -> JSONResponse | EventSourceResponse:
        return await serve(body, credentials)

    @router.get("/models")
    async def models() -> ModelList:
        return model_list(service)

    return router


def _user_field(body: bytes) -> str | None:
    """The ``user`` of a request that failed validation, if it can be read at all."""
    with contextlib.suppress(ValueError):
        data = json.loads(body)
        user = data.get("user") if isinstance(data, dict) else None
        return user[:MAX_USER_LENGTH] if isinstance(user, str) else None
    return None


def create_app(service: InferenceService, extra_routers: list[APIRouter] | None = None) -> FastAPI:
    app = FastAPI(title="cluster: OpenAI-compatible LLM API", version="0.1.0")
    service.status_of = status_of  # the ledger records the status the client got

    async def invalid(request: Request, error: InvalidRequest) -> None:
        """A 400 still counts against the key and user, for abuse monitoring."""
        await service.gate.record_rejection(
            api_key=bearer_key(request.headers.get("authorization")),
            user=_user_field(await request.body()), model="", reason=error.code)
        service.metrics.rejected("", error)

    install_error_handlers(app, on_invalid=invalid)
    openapi.install(app, list(service.specs.values()))
    router = openai_router(service)
    app.include_router(router, prefix="/v1/openai")
    app.include_router(router, prefix="/v1")
    for extra in extra_routers or []:
        app.include_router(extra)

    @app.get("/health", responses={503: {"description": "Some model has no ready replica"}})
    async def health() -> JSONResponse:
        states = await asyncio.gather(*(service.router.ready(m) for m in service.specs))
        models = dict(zip(service.specs, states, strict=True))
        ok = all(states)
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": models},
                            status_code=200 if ok else 503)

    return app
