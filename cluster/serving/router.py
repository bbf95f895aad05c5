"""Reaching a model's replicas through Serve handles, and Serve's refusals as domain errors.

:class:`ModelRouter` is what the chat service needs; :class:`HandleRouter` is the Serve
implementation (tests route in process).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Protocol, cast

from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from cluster.errors import ModelOverloaded, ModelUnavailable
from cluster.serving.messages import EngineCall, Reply, StreamItem


class ModelRouter(Protocol):
    """Reaches a model's replicas (Serve handles in production, in-process in tests)."""

    async def generate(self, model: str, call: EngineCall) -> Reply: ...

    def stream(self, model: str, call: EngineCall) -> AsyncIterator[StreamItem]: ...

    async def ready(self, model: str) -> bool: ...


@contextlib.contextmanager
def serve_refusals(model: str) -> Iterator[None]:
    """Serve's refusals as retryable errors: the model's queue at this ingress is full
    (``max_queued_requests``), or the replica chosen died or its deployment has none."""
    try:
        yield
    except BackPressureError as e:
        raise ModelOverloaded(f"The model '{model}' is at capacity; retry shortly.",
                              retry_after_s=e.retry_after_s or 1) from e
    except (ReplicaUnavailableError, DeploymentUnavailableError, ActorDiedError,
            ActorUnavailableError) as e:
        raise ModelUnavailable(f"No replica of the model '{model}' could take the request; "
                               "retry shortly.", retry_after_s=1) from e


class HandleRouter:
    """Routes to model deployments through Serve handles."""

    def __init__(self, handles: dict[str, DeploymentHandle], ready_timeout_s: float = 2.0):
        self.handles = handles
        self.ready_timeout_s = ready_timeout_s

    async def generate(self, model: str, call: EngineCall) -> Reply:
        with serve_refusals(model):
            result: Reply = await self.handles[model].generate.remote(call)
        return result

    async def stream(self, model: str, call: EngineCall) -> AsyncIterator[StreamItem]:
        gen = cast(DeploymentResponseGenerator,
                   self.handles[model].options(stream=True).stream.remote(call))
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
