"""The engine replica: one Ray Serve deployment per model, each replica owning an engine.

:class:`ReplicaCore` is the logic (free of Serve, unit-testable with any ``ChatEngine``);
:class:`ModelReplica` is the Serve deployment around it. Replicas know nothing of HTTP,
keys, prices or Redis: they return bodies and stream batches, the ingress does the rest.

Streaming protocol to the ingress (one Ray object per item):
  first item  ``{"ok": True}`` or ``{"error": {...}, "status": int}`` - so the ingress can
              still answer 4xx before it starts the SSE response;
  then        ``StreamBatch`` dicts: ``data`` (SSE text of one or more chunks, coalesced
              when the ingress lags), ``chunks`` (how many), ``usage_chunk`` (the engine's
              final usage-only chunk, once, at the end) and ``failed`` (an error was sent).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypedDict

from ray import serve

from cluster.catalog import ModelSpec
from cluster.engine import ChatEngine, EngineRequestError, VLLMChatEngine
from cluster.settings import get_settings
from cluster.streaming import close, coalesce

log = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"
# vLLM 0.32 writes always-null internal fields into chunks; the seeds' chunks have no such
# fields. Removing the exact text is far cheaper than re-serialising every chunk.
NULL_NOISE = (',"prompt_token_ids":null,"prompt_text":null', ',"token_ids":null')


class StreamBatch(TypedDict):
    data: str
    chunks: int
    usage_chunk: dict[str, Any] | None
    failed: bool


def error_item(e: EngineRequestError) -> dict[str, Any]:
    return {"error": {"message": e.message, "param": e.param}, "status": e.status}


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

    async def chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            result = await self.engine.chat(payload | {"stream": False})
        except EngineRequestError as e:
            return error_item(e)
        assert isinstance(result, dict)
        return {"ok": result}

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        # Always ask the engine for the final usage: billing and limits need it.
        payload = payload | {"stream": True, "stream_options": {"include_usage": True}}
        try:
            events = await self.engine.chat(payload)
        except EngineRequestError as e:
            yield error_item(e)
            return
        assert not isinstance(events, dict)
        self.active_streams += 1
        batches = coalesce(events, min_interval=self._message_interval)
        try:
            yield {"ok": True}
            async for batch in batches:
                out = _batch(batch)
                if out["chunks"] or out["usage_chunk"]:
                    yield dict(out)
        finally:  # a consumer that left cancels the engine's request now
            self.active_streams -= 1
            await close(batches)
            await close(events)  # in case the batches never started


def resolve_model_path(spec: ModelSpec) -> str:
    """The directory or hub id vLLM loads for a spec."""
    src = spec.source
    if src.builtin:
        from cluster.local_models import ensure_builtin

        cache = get_settings().cache_dir
        return str(ensure_builtin(src.builtin, cache, progress=log.info))
    if src.path:
        return str(Path(src.path).expanduser())
    assert src.hf is not None
    return src.hf


@serve.deployment
class ModelReplica:
    """A Serve replica owning one engine. ``engine_cls`` is injectable for tests, as in
    Ray Serve LLM's ``LLMServer``."""

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, spec: dict[str, Any], engine_cls: type[ChatEngine] | None = None,
    ) -> None:
        model = ModelSpec.model_validate(spec)
        engine = (engine_cls or VLLMChatEngine)(model, resolve_model_path(model))  # type: ignore[call-arg]
        await engine.start()
        self.core = ReplicaCore(model, engine)

    async def chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.core.chat(payload)

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self.core.stream(payload):
            yield item

    async def model_id(self) -> str:
        return self.core.spec.id

    async def unfinished_requests(self) -> int:
        return self.core.engine.unfinished_requests()

    async def check_health(self) -> None:
        """Called by Serve; a raise marks the replica unhealthy and Serve replaces it."""
        await self.core.engine.check_health()
