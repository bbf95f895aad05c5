"""Chat completions at the ingress: admit, route to the model's replicas, price, settle.

Every request that passes admission is settled exactly once (``finally``), whether it
finished, failed or the client hung up, so limits and spend never drift.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from cluster.admission import Admission, Gate, Outcome, Usage
from cluster.catalog import ModelSpec
from cluster.errors import APIError, EngineError, ModelNotFound, from_error_body
from cluster.metrics import IngressMetrics, NullMetrics, RequestRecord
from cluster.protocol import ChatCompletionRequest
from cluster.streaming import close, coalesce

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
    settled: bool = False

    def failed(self, error: APIError) -> APIError:
        self.outcome, self.status = Outcome.error, error.status_code
        return error

    def mark_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()


def _engine_error(item: Mapping[str, Any]) -> APIError:
    return from_error_body({"error": item["error"]}, int(item.get("status", 400)))


class _SettlingEventSource(EventSourceResponse):
    """An SSE response that runs ``on_close`` however it ends.

    sse-starlette never starts the body when the client leaves before the response headers
    are sent; an unstarted generator's ``finally`` never runs, so the body cannot be the
    only place a stream is settled (its slot and reservation would leak).
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close()


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
            error = tally.failed(e if isinstance(e, APIError) else EngineError(
                f"The model '{spec.id}' failed: {type(e).__name__}"))
            await self._settle(req, spec, admission, tally)
            raise error from e
        if "error" in first:
            error = tally.failed(_engine_error(first))
            await self._settle(req, spec, admission, tally)
            raise error

        async def unstarted() -> None:  # a no-op when the body ran: it settled itself
            if not tally.settled:
                await close(items)  # cancels the generation in the replica
                await self._settle(req, spec, admission, tally)

        return _SettlingEventSource(self._events(req, spec, admission, items, tally), unstarted,
                                    headers=admission.headers, ping=15, sep="\n")

    async def _events(self, req: ChatCompletionRequest, spec: ModelSpec, admission: Admission,
                      items: AsyncIterator[dict[str, Any]], tally: _Tally,
                      ) -> AsyncIterator[bytes]:
        failed = False
        coalesced = coalesce(items)
        try:
            async for batches in coalesced:
                failed = failed or any(b["failed"] for b in batches)
                if data := self._frame(req, spec, batches, tally):
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
            # Settled here, before the body's last byte, so the client's next request sees
            # it; the response settles only a body that never started.
            with anyio.CancelScope(shield=True):  # settle even when the client left
                await close(coalesced)  # closes items: cancels the replica's stream
                await self._settle(req, spec, admission, tally)

    def _frame(self, req: ChatCompletionRequest, spec: ModelSpec,
               batches: list[dict[str, Any]], tally: _Tally) -> str:
        """The SSE text of some replica batches, counted, with the usage chunk priced."""
        data = "".join(b["data"] for b in batches)
        for b in batches:
            tally.chunks += b["chunks"]
            usage_chunk = b["usage_chunk"]
            if usage_chunk:
                tally.usage = usage_chunk["usage"]
            if usage_chunk and req.wants_usage_chunk:
                usage_chunk["usage"] = self._priced(spec, usage_chunk["usage"])
                data += f"data: {json.dumps(usage_chunk, separators=COMPACT)}\n\n"
        return data

    def _priced(self, spec: ModelSpec, usage: Mapping[str, Any] | None) -> dict[str, Any]:
        usage = dict(usage or {})
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "estimated_cost": spec.pricing.cost(prompt, completion)}

    async def _settle(self, req: ChatCompletionRequest, spec: ModelSpec, admission: Admission,
                      tally: _Tally) -> None:
        if tally.settled:
            return
        tally.settled = True
        if tally.usage is None and tally.outcome is Outcome.disconnected:
            # The engine never reported: charge the estimate and what was delivered.
            tally.usage = {"prompt_tokens": req.estimated_prompt_tokens(),
                           "completion_tokens": tally.chunks}
        priced = self._priced(spec, tally.usage)
        usage = Usage(priced["prompt_tokens"], priced["completion_tokens"],
                      priced["estimated_cost"])
        try:
            await asyncio.shield(self.gate.settle(admission, usage, tally.outcome))
        finally:  # even when cancelled while waiting for the shielded settlement
            self._record(req, spec, tally, usage)

    def _record(self, req: ChatCompletionRequest, spec: ModelSpec, tally: _Tally,
                usage: Usage) -> None:
        self.metrics.ongoing(spec.id, -1)
        now = time.perf_counter()
        self.metrics.finished(RequestRecord(
            model=spec.id, status=tally.status, outcome=tally.outcome.value, stream=req.stream,
            e2e_s=now - tally.started,
            ttft_s=None if tally.first_byte is None else tally.first_byte - tally.started,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            estimated_cost=usage.estimated_cost))
