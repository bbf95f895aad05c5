"""The engine replica: one Ray Serve deployment per model, each replica owning an engine.

:class:`ReplicaCore` is the logic (free of Serve, unit-testable with any ``Engine``);
:class:`ModelReplica` is the Serve deployment around it. Replicas know nothing of HTTP,
keys, prices or Redis: they answer the typed messages of :mod:`cluster.serving.messages`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve

from cluster.config.catalog import ModelSpec
from cluster.serving.coalesce import close, coalesce
from cluster.serving.engine import Engine, RequestRejected, VLLMEngine
from cluster.serving.messages import (
    Completion,
    EngineCall,
    Reply,
    StreamBatch,
    StreamItem,
    StreamOpened,
)

log = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"
# vLLM 0.32 writes always-null internal fields into chunks; OpenAI's chunks have no such
# fields. Removing the exact text is far cheaper than re-serialising every chunk.
NULL_NOISE = (',"prompt_token_ids":null,"prompt_text":null', ',"prompt_token_ids":null',
              ',"token_ids":null')


def _batch(events: list[str]) -> StreamBatch:
    """Fold SSE events into one batch, taking out [DONE] and the usage-only chunk (the
    ingress re-emits those itself, with the cost and only if the client asked)."""
    kept: list[str] = []
    usage_chunk = None
    failed = False
    for event in events:
        if event == DONE_EVENT:
            continue
        if '"usage"' in event:
            chunk = json.loads(event[len("data: "):])
            if not chunk.get("choices") and chunk.get("usage"):
                usage_chunk = chunk
                continue
        if event.startswith('data: {"error"'):
            failed = True
        for noise in NULL_NOISE:
            event = event.replace(noise, "")
        kept.append(event)
    return StreamBatch(data="".join(kept), chunks=len(kept), usage_chunk=usage_chunk,
                       failed=failed)


class ReplicaCore:
    """Runs requests on an engine; see :mod:`cluster.serving.messages` for the protocol."""

    def __init__(self, spec: ModelSpec, engine: Engine) -> None:
        self.spec = spec
        self.engine = engine
        self.active_streams = 0

    def _message_interval(self) -> float:
        """Seconds between messages of one stream: 0 unless this replica is busy."""
        s = self.spec.streaming
        return s.busy_interval_ms / 1000 if self.active_streams > s.busy_streams else 0.0

    async def generate(self, call: EngineCall) -> Reply:
        try:
            result = await self.engine.generate(call.with_fields(stream=False))
        except RequestRejected as e:
            return e.rejected
        assert isinstance(result, dict)
        return Completion(result)

    async def stream(self, call: EngineCall) -> AsyncIterator[StreamItem]:
        # Always ask the engine for the final usage: billing and limits need it.
        call = call.with_fields(stream=True, stream_options={"include_usage": True})
        try:
            events = await self.engine.generate(call)
        except RequestRejected as e:
            yield e.rejected
            return
        assert not isinstance(events, dict)
        self.active_streams += 1
        batches = coalesce(events, min_interval=self._message_interval)
        try:
            yield StreamOpened()
            async for batch in batches:
                out = _batch(batch)
                if out.chunks or out.usage_chunk:
                    yield out
        finally:  # a consumer that left cancels the engine's request now
            self.active_streams -= 1
            await close(batches)
            await close(events)  # in case the batches never started


@serve.deployment
class ModelReplica:
    """A Serve replica owning one engine. ``engine_cls`` is injectable for tests, as in
    Ray Serve LLM's ``LLMServer``."""

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, spec: ModelSpec, cache_dir: Path, engine_cls: type[Engine] | None = None,
    ) -> None:
        engine = (engine_cls or VLLMEngine)(spec, spec.source.resolve(cache_dir))  # type: ignore[call-arg]
        await engine.start()
        self.core = ReplicaCore(spec, engine)

    async def generate(self, call: EngineCall) -> Reply:
        return await self.core.generate(call)

    async def stream(self, call: EngineCall) -> AsyncIterator[StreamItem]:
        async for item in self.core.stream(call):
            yield item

    async def model_id(self) -> str:
        return self.core.spec.id

    async def unfinished_requests(self) -> int:
        return self.core.engine.unfinished_requests()

    async def check_health(self) -> None:
        """Called by Serve; a raise marks the replica unhealthy and Serve replaces it."""
        await self.core.engine.check_health()
