"""The Serve ingress deployment: the FastAPI app of :mod:`cluster.api.routes` over the chat
service, the gate and the metrics, built per replica from the validated settings and model
specs the application builder hands down."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from fastapi import APIRouter, FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.api.abuse_metrics import RayAbuseMetrics
from cluster.api.admin import make_admin_router
from cluster.api.metrics import RayIngressMetrics
from cluster.api.routes import create_app
from cluster.config.catalog import ModelSpec
from cluster.config.settings import Settings
from cluster.gate.contract import Gate, OpenGate
from cluster.gate.monitor import AbuseMonitor, MonitorObserver
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


def replica_name() -> str:
    """This replica's Serve id (``llm#Ingress#abc123``), else host:pid outside Serve."""
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # not in a replica (tests, scripts)
        return f"{socket.gethostname()}:{os.getpid()}"


def start_abuse_monitor(gate: Gate, settings: Settings,
                        observer: MonitorObserver | None = None) -> AbuseMonitor | None:
    """The abuse monitor of this replica (only the lease holder evaluates), in the
    background of the running event loop, reporting to Ray's metrics unless ``observer`` is
    given; none without Redis."""
    if not isinstance(gate, RedisGate):
        return None
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        log.warning("no event loop in the ingress constructor: abuse monitor not started")
        return None
    monitor = AbuseMonitor(gate.redis, settings.abuse, gate.keys, replica=replica_name(),
                           observer=observer or RayAbuseMetrics())
    monitor.start()
    return monitor


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
        # Serve runs the constructor on the replica's event loop.
        self.monitor = start_abuse_monitor(self.gate, settings)

    async def __del__(self) -> None:
        """Serve's graceful shutdown: release the evaluator lease, so that another replica
        takes over at once rather than when the lease runs out, and resend the settlements
        kept while Redis was unreachable."""
        monitor = getattr(self, "monitor", None)  # None if the constructor failed first
        if monitor is not None:
            await monitor.stop(release=True)
        gate = getattr(self, "gate", None)
        if gate is not None:
            await gate.close()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service, self.routers)
