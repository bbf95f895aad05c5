"""Chat completions at the ingress: admit, route to the model's replicas, price, settle.

Every request that passes admission is settled exactly once (``finally``), whether it
finished, failed or the client hung up, so limits and spend never drift.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from cluster.admission import Admission, Gate, Outcome, Usage
from cluster.catalog import ModelSpec
from cluster.errors import APIError, EngineError, ModelNotFound, from_error_body
from cluster.metrics import IngressMetrics, NullMetrics, RequestRecord
from cluster.protocol import ChatCompletionRequest
from cluster.streaming import coalesce

DONE = b"data: [DONE]\n\n"
COMPACT = (",", ":")  # the engine's chunks are compact JSON: so is ours


class ModelRouter(Protocol):
    """Reaches a model's replicas (Serve handles in production, in-process in tests)."""

    async def chat(self, model: str, payload: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, model: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def ready(self, model: str) -> bool: ...


@dataclass
class _Tally:
    """What a request used, known exactly at the end or estimated on a hang-up."""

    started: float = field(default_factory=time.perf_counter)
    first_byte: float | None = None
    chunks: int = 0
    usage: dict[str, Any] | None = None
    outcome: Outcome = Outcome.disconnected
    status: int = 200  # the HTTP status the client got

    def failed(self, error: APIError) -> APIError:
        self.outcome, self.status = Outcome.error, error.status_code
        return error

    def mark_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()


def _engine_error(item: Mapping[str, Any]) -> APIError:
    return from_error_body({"error": item["error"]}, int(item.get("status", 400)))


class ChatService:
    def __init__(self, specs: list[ModelSpec], router: ModelRouter, gate: Gate,
                 metrics: IngressMetrics | None = None) -> None:
        self.specs = {s.id: s for s in specs}
        self.router = router
        self.gate = gate
        self.metrics = metrics or NullMetrics()

    def spec(self, model: str) -> ModelSpec:
        try:
            return self.specs[model]
        except KeyError:
            raise ModelNotFound(f"The model '{model}' does not exist or is not served here.",
                                param="model") from None

    async def create(self, req: ChatCompletionRequest,
                     api_key: str | None) -> JSONResponse | EventSourceResponse:
        try:
            spec = self.spec(req.model)
        except APIError:
            await self.gate.record_rejection(api_key=api_key, user=req.user, model=req.model,
                                             reason="model_not_found")
            self.metrics.rejected(req.model, "model_not_found")
            raise
        reserve = req.estimated_prompt_tokens() + (req.output_limit or spec.default_max_tokens)
        try:
            admission = await self.gate.admit(api_key=api_key, user=req.user, model=spec,
                                              reserve_tokens=reserve)
        except APIError as e:
            self.metrics.rejected(spec.id, e.code or e.type)
            raise
        self.metrics.ongoing(spec.id, 1)  # -1 in _settle, which every path reaches
        handler = self._stream if req.stream else self._complete
        return await handler(req, spec, admission)

    async def _complete(self, req: ChatCompletionRequest, spec: ModelSpec,
                        admission: Admission) -> JSONResponse:
        tally = _Tally()
        try:
            item = await self.router.chat(spec.id, req.engine_payload())
            if "error" in item:
                raise _engine_error(item)
            body = item["ok"]
            tally.mark_first_byte()
            tally.usage = body.get("usage")
            body["usage"] = self._priced(spec, tally.usage)
            tally.outcome = Outcome.ok
            return JSONResponse(body, headers=admission.headers)
        except APIError as e:
            raise tally.failed(e) from None
        except Exception as e:
            raise tally.failed(EngineError(
                f"The model '{spec.id}' failed: {type(e).__name__}")) from e
        finally:
            await self._settle(req, spec, admission, tally)

    async def _stream(self, req: ChatCompletionRequest, spec: ModelSpec,
                      admission: Admission) -> EventSourceResponse:
        tally = _Tally()
        items = self.router.stream(spec.id, req.engine_payload())
        try:
            first = await anext(items)
        except Exception as e:
            error = tally.failed(EngineError(f"The model '{spec.id}' failed: "
                                             f"{type(e).__name__}"))
            await self._settle(req, spec, admission, tally)
            raise error from e
        if "error" in first:
            error = tally.failed(_engine_error(first))
            await self._settle(req, spec, admission, tally)
            raise error
        return EventSourceResponse(self._events(req, spec, admission, items, tally),
                                   headers=admission.headers, ping=15, sep="\n")

    async def _events(self, req: ChatCompletionRequest, spec: ModelSpec, admission: Admission,
                      items: AsyncIterator[dict[str, Any]], tally: _Tally,
                      ) -> AsyncIterator[bytes]:
        failed = False
        try:
            async for batches in coalesce(items):
                data = "".join(b["data"] for b in batches)
                for b in batches:
                    tally.chunks += b["chunks"]
                    failed = failed or b["failed"]
                    usage_chunk = b["usage_chunk"]
                    if usage_chunk:
                        tally.usage = usage_chunk["usage"]
                    if usage_chunk and req.wants_usage_chunk:
                        usage_chunk["usage"] = self._priced(spec, usage_chunk["usage"])
                        data += f"data: {json.dumps(usage_chunk, separators=COMPACT)}\n\n"
                if data:
                    tally.mark_first_byte()
                    yield data.encode()
            yield DONE
            tally.outcome = Outcome.error if failed else Outcome.ok
        except Exception as e:  # the replica died mid-stream: tell the client, then end
            tally.outcome = Outcome.error
            err = e if isinstance(e, APIError) else EngineError(
                f"The model '{spec.id}' failed while streaming: {type(e).__name__}")
            yield err.sse().encode()
            yield DONE
        finally:
            with anyio.CancelScope(shield=True):  # settle even when the client left
                await self._settle(req, spec, admission, tally)

    def _priced(self, spec: ModelSpec, usage: Mapping[str, Any] | None) -> dict[str, Any]:
        usage = dict(usage or {})
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "estimated_cost": spec.pricing.cost(prompt, completion)}

    async def _settle(self, req: ChatCompletionRequest, spec: ModelSpec, admission: Admission,
                      tally: _Tally) -> None:
        if tally.usage is None and tally.outcome is Outcome.disconnected:
            # The engine never reported: charge the estimate and what was delivered.
            tally.usage = {"prompt_tokens": req.estimated_prompt_tokens(),
                           "completion_tokens": tally.chunks}
        priced = self._priced(spec, tally.usage)
        usage = Usage(priced["prompt_tokens"], priced["completion_tokens"],
                      priced["estimated_cost"])
        await asyncio.shield(self.gate.settle(admission, usage, tally.outcome))
        self.metrics.ongoing(spec.id, -1)
        now = time.perf_counter()
        self.metrics.finished(RequestRecord(
            model=spec.id, status=tally.status, outcome=tally.outcome.value, stream=req.stream,
            e2e_s=now - tally.started,
            ttft_s=None if tally.first_byte is None else tally.first_byte - tally.started,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            estimated_cost=usage.estimated_cost))
