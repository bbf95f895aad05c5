"""The engine replica: one Ray Serve deployment per model, each replica owning an engine.

:class:`ReplicaCore` is the logic (free of Serve, unit-testable with any ``ChatEngine``);
:class:`ModelReplica` is the Serve deployment around it. Replicas know nothing of HTTP,
keys, prices or Redis: they answer the typed messages of :mod:`cluster.serving.messages`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from cluster.config.catalog import ModelSpec
from cluster.serving.coalesce import close, coalesce
from cluster.serving.engine import ChatEngine, RequestRejected, VLLMChatEngine
from cluster.serving.messages import ChatReply, Completion, StreamBatch, StreamItem, StreamOpened

log = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"
# vLLM 0.32 writes always-null internal fields into chunks; OpenAI's chunks have no such
# fields. Removing the exact text is far cheaper than re-serialising every chunk.
NULL_NOISE = (',"prompt_token_ids":null,"prompt_text":null', ',"token_ids":null')


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
    """Runs chat requests on an engine; see the module docstring for the stream protocol."""

    def __init__(self, spec: ModelSpec, engine: ChatEngine) -> None:
        self.spec = spec
        self.engine = engine
        self.active_streams = 0

    def _message_interval(self) -> float:
        """Seconds between messages of one stream: 0 unless this replica is busy."""
        s = self.spec.streaming
        return s.busy_interval_ms / 1000 if self.active_streams > s.busy_streams else 0.0

    async def chat(self, payload: dict[str, Any]) -> ChatReply:
        try:
            result = await self.engine.chat(payload | {"stream": False})
        except RequestRejected as e:
            return e.rejected
        assert isinstance(result, dict)
        return Completion(result)

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[StreamItem]:
        # Always ask the engine for the final usage: billing and limits need it.
        payload = payload | {"stream": True, "stream_options": {"include_usage": True}}
        try:
            events = await self.engine.chat(payload)
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
        self, spec: ModelSpec, cache_dir: Path, engine_cls: type[ChatEngine] | None = None,
    ) -> None:
        engine = (engine_cls or VLLMChatEngine)(spec, spec.source.resolve(cache_dir))  # type: ignore[call-arg]
        await engine.start()
        self.core = ReplicaCore(spec, engine)

    async def chat(self, payload: dict[str, Any]) -> ChatReply:
        return await self.core.chat(payload)

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[StreamItem]:
        async for item in self.core.stream(payload):
            yield item

    async def model_id(self) -> str:
        return self.core.spec.id

    async def unfinished_requests(self) -> int:
        return self.core.engine.unfinished_requests()

    async def check_health(self) -> None:
        """Called by Serve; a raise marks the replica unhealthy and Serve replaces it."""
        await self.core.engine.check_health()
