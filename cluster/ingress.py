"""The HTTP ingress: OpenAI-compatible routes on FastAPI, as a Ray Serve deployment.

Routes stay thin: parsing and validation are the protocol models' job, admission the gate's,
routing and billing :class:`~cluster.completions.ChatService`'s, errors :mod:`cluster.errors`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, cast

from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from sse_starlette import EventSourceResponse

from cluster.admission import Gate, OpenGate
from cluster.catalog import ModelSpec
from cluster.completions import ChatService
from cluster.errors import ServiceUnavailable, install_error_handlers, validation_error
from cluster.metrics import RayIngressMetrics
from cluster.protocol import ChatCompletionRequest, ModelCard, ModelList
from cluster.settings import Settings, get_settings

log = logging.getLogger(__name__)
STARTED = int(time.time())


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def model_list(service: ChatService) -> ModelList:
    return ModelList(data=[
        ModelCard(id=s.id, created=STARTED, owned_by=s.id.split("/")[0],
                  context_length=s.engine.max_model_len, description=s.description,
                  pricing={"input_per_million": s.pricing.input_per_million,
                           "output_per_million": s.pricing.output_per_million,
                           "currency": "USD"})
        for s in service.specs.values()])


def openai_router(service: ChatService) -> APIRouter:
    router = APIRouter()

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest,
        authorization: Annotated[str | None, Header()] = None,
    ) -> JSONResponse | EventSourceResponse:
        return await service.create(body, bearer_key(authorization))

    @router.get("/models")
    async def models() -> ModelList:
        return model_list(service)

    return router


def create_app(service: ChatService, extra_routers: list[APIRouter] | None = None) -> FastAPI:
    app = FastAPI(title="cluster: OpenAI-compatible LLM API", version="0.1.0")
    install_error_handlers(app)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A 400 still counts against the key and user, for abuse monitoring."""
        error = validation_error(exc)
        body = await request.body()
        user = _user_field(body)
        await service.gate.record_rejection(
            api_key=bearer_key(request.headers.get("authorization")), user=user,
            model="", reason="400")
        service.metrics.rejected("", "invalid_request")
        return error.response()
    router = openai_router(service)
    app.include_router(router, prefix="/v1/openai")
    app.include_router(router, prefix="/v1")
    for extra in extra_routers or []:
        app.include_router(extra)

    @app.get("/health")
    async def health() -> JSONResponse:
        states = await asyncio.gather(*(service.router.ready(m) for m in service.specs))
        models = dict(zip(service.specs, states, strict=True))
        ok = all(states)
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": models},
                            status_code=200 if ok else 503)

    return app


def _user_field(body: bytes) -> str | None:
    """The ``user`` of a request that failed validation, if it can be read at all."""
    with contextlib.suppress(ValueError):
        user = json.loads(body).get("user")
        return user if isinstance(user, str) else None
    return None


@contextlib.contextmanager
def serve_refusals(model: str) -> Iterator[None]:
    """Serve's refusals as 503s with ``Retry-After``, which clients (the openai SDK among
    them) retry: the model's queue at this ingress is full (``max_queued_requests``), or the
    replica chosen died or its deployment has none."""
    try:
        yield
    except BackPressureError as e:
        retry = str(math.ceil(e.retry_after_s or 1))
        raise ServiceUnavailable(f"The model '{model}' is at capacity; retry shortly.",
                                 code="model_overloaded", headers={"Retry-After": retry}
                                 ) from e
    except (ReplicaUnavailableError, DeploymentUnavailableError, ActorDiedError,
            ActorUnavailableError) as e:
        raise ServiceUnavailable(f"No replica of the model '{model}' could take the request; "
                                 "retry shortly.", code="model_unavailable",
                                 headers={"Retry-After": "1"}) from e


class HandleRouter:
    """Routes to model deployments through Serve handles."""

    def __init__(self, handles: dict[str, DeploymentHandle], ready_timeout_s: float = 2.0):
        self.handles = handles
        self.ready_timeout_s = ready_timeout_s

    async def chat(self, model: str, payload: dict[str, Any]) -> dict[str, Any]:
        with serve_refusals(model):
            result: dict[str, Any] = await self.handles[model].chat.remote(payload)
        return result

    async def stream(self, model: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        gen = cast(DeploymentResponseGenerator,
                   self.handles[model].options(stream=True).stream.remote(payload))
        finished = False
        try:
            with serve_refusals(model):
                async for item in gen:
                    yield item
            finished = True
        finally:
            if not finished:  # the client left: stop the replica, which aborts in vLLM
                gen.cancel()

    async def ready(self, model: str) -> bool:
        with contextlib.suppress(Exception):
            got = await asyncio.wait_for(self.handles[model].model_id.remote(),
                                         self.ready_timeout_s)
            return bool(got == model)
        return False


def make_gate(settings: Settings) -> Gate:
    """Redis-backed keys and limits when Redis is configured; otherwise only an explicit
    anonymous demo mode admits requests without checks."""
    if settings.redis_url:
        from cluster.limits import RedisGate

        return RedisGate.from_settings(settings)
    if settings.allow_anonymous:
        log.warning("No Redis configured and CLUSTER_ALLOW_ANONYMOUS is on: no keys, no limits")
        return OpenGate()
    raise RuntimeError("CLUSTER_REDIS_URL is not set (set CLUSTER_ALLOW_ANONYMOUS=1 for a "
                       "demo without keys)")


def admin_routers(gate: Gate, settings: Settings) -> list[APIRouter]:
    """The admin API, on the same Redis as the gate (none without Redis)."""
    from cluster.limits import RedisGate

    if not isinstance(gate, RedisGate):
        return []
    from cluster.admin import make_admin_router

    return [make_admin_router(lambda: gate.redis, settings=settings)]


@serve.deployment
@serve.ingress()
class Ingress:
    """The Serve ingress deployment; its FastAPI app is built per replica at start."""

    def __init__(self, models: list[dict[str, Any]],
                 handles: dict[str, DeploymentHandle]) -> None:
        settings = get_settings()
        specs = [ModelSpec.model_validate(m) for m in models]
        self.gate = make_gate(settings)
        self.service = ChatService(specs, HandleRouter(handles), self.gate,
                                   metrics=RayIngressMetrics(specs, self.gate))
        self.routers = admin_routers(self.gate, settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service, self.routers)
