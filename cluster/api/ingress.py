"""The Serve ingress deployment: the FastAPI app of :mod:`cluster.api.routes` over the chat
service, the gate and the metrics, built per replica from the validated settings and model
specs the application builder hands down."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.api.admin import make_admin_router
from cluster.api.metrics import RayIngressMetrics
from cluster.api.routes import create_app
from cluster.config.catalog import ModelSpec
from cluster.config.settings import Settings
from cluster.gate.contract import Gate, OpenGate
from cluster.gate.redis_gate import RedisGate
from cluster.serving.router import HandleRouter
from cluster.serving.service import InferenceService

log = logging.getLogger(__name__)


def make_gate(settings: Settings) -> Gate:
    """Redis-backed keys and limits when Redis is configured; otherwise only an explicit
    anonymous demo mode admits requests without checks."""
    if settings.redis_url:
        return RedisGate.from_url(settings.redis_url, settings)
    if settings.allow_anonymous:
        log.warning("No Redis configured and CLUSTER_ALLOW_ANONYMOUS is on: no keys, no limits")
        return OpenGate()
    raise RuntimeError("CLUSTER_REDIS_URL is not set (set CLUSTER_ALLOW_ANONYMOUS=1 for a "
                       "demo without keys)")


def admin_routers(gate: Gate, settings: Settings) -> list[APIRouter]:
    """The admin API, on the same Redis as the gate (none without Redis)."""
    if not isinstance(gate, RedisGate):
        return []
    return [make_admin_router(lambda: gate.redis, settings)]


@serve.deployment
@serve.ingress()
class Ingress:
    """The Serve ingress deployment; its FastAPI app is built per replica at start."""

    def __init__(self, settings: Settings, specs: list[ModelSpec],
                 handles: dict[str, DeploymentHandle]) -> None:
        self.gate = make_gate(settings)
        self.service = InferenceService(specs, HandleRouter(handles), self.gate,
                                        metrics=RayIngressMetrics(specs, self.gate))
        self.routers = admin_routers(self.gate, settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service, self.routers)
