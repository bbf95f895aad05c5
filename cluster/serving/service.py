"""A request's life at the ingress, for chat and completions alike: check, admit, route to
the model's replicas, price, stream, settle. Only the protocol model and the engine call
differ between the endpoints (:class:`InferenceRequest`, :class:`EngineCall`).

Every request that passes admission is settled exactly once (``finally``), whether it
finished, failed or the client hung up, so limits and spend never drift. The service knows
no HTTP: it returns a :class:`InferenceResponse` or a :class:`InferenceStream` and raises
:mod:`cluster.errors` exceptions; the API layer renders them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import anyio

from cluster.config.catalog import Endpoint, ModelSpec
from cluster.errors import (
    ClusterError,
    EngineFailed,
    InvalidRequest,
    ModelNotFound,
    RateLimitState,
    RequestTooLarge,
)
from cluster.gate.contract import Admission, Ending, Gate, Outcome, Usage
from cluster.serving.coalesce import close, coalesce
from cluster.serving.messages import EngineCall, Rejected, StreamBatch, StreamItem
from cluster.serving.observer import IngressMetrics, NullMetrics, RequestRecord
from cluster.serving.router import ModelRouter

DONE = b"data: [DONE]\n\n"
StatusOf = Callable[[ClusterError], int]
COMPACT = (",", ":")  # the engine's chunks are compact JSON: so is ours


class InferenceRequest(Protocol):
    """What the service reads of a validated request (the API's protocol models)."""

    endpoint: ClassVar[Endpoint]
    model: str
    user: str | None
    stream: bool

    @property
    def output_limit(self) -> int | None: ...

    @property
    def choices(self) -> int: ...

    def token_limits(self) -> dict[str, int]: ...

    @property
    def wants_usage_chunk(self) -> bool: ...

    def engine_payload(self) -> dict[str, Any]: ...

    def estimated_prompt_tokens(self) -> int: ...


@dataclass(frozen=True)
class InferenceResponse:
    body: dict[str, Any]
    rate: RateLimitState | None


@dataclass(frozen=True)
class InferenceStream:
    """SSE bytes, or a :class:`ClusterError` to send as a mid-stream error event.
    ``on_unstarted`` settles a stream whose body never ran (the client left before the
    headers went out); it is a no-op once the body ran."""

    events: AsyncIterator[bytes | ClusterError]
    rate: RateLimitState | None
    on_unstarted: Callable[[], Awaitable[None]]


@dataclass
class _Tally:
    """What a request used, known exactly at the end or estimated on a hang-up."""

    started: float = field(default_factory=time.perf_counter)
    first_byte: float | None = None
    chunks: int = 0
    usage: dict[str, Any] | None = None
    outcome: Outcome = Outcome.disconnected
    error: ClusterError | None = None  # what the client got instead of a 200
    settled: bool = False

    def failed(self, error: ClusterError) -> ClusterError:
        self.outcome, self.error = Outcome.error, error
        return error

    def status(self, status_of: StatusOf | None) -> int:
        """The HTTP status the client got (a stream that failed midway had its 200; 0:
        unknown, no API layer said how it renders errors)."""
        if self.error is None or self.first_byte is not None:
            return 200
        return status_of(self.error) if status_of else 0

    def mark_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()


def _as_error(model: str, exc: BaseException, *, streaming: bool = False) -> ClusterError:
    return exc if isinstance(exc, ClusterError) else EngineFailed.of(model, exc,
                                                                      streaming=streaming)


def cached_tokens(usage: Mapping[str, Any]) -> int:
    """Prompt tokens the engine served from its prefix cache (vLLM:
    ``prompt_tokens_details.cached_tokens``; absent: none)."""
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def _call(req: InferenceRequest) -> EngineCall:
    return EngineCall(req.endpoint, req.engine_payload())


def check_possible(req: InferenceRequest, spec: ModelSpec) -> None:
    """Refuse what no limit could change: an endpoint the model does not serve, more choices
    than it allows, a completion budget the context cannot hold (the prompt takes at least
    one token). The engine checks the prompt's real length."""
    if req.endpoint not in spec.endpoints:
        served = " or ".join(e.path for e in spec.endpoints)
        raise ModelNotFound(spec.id, message=f"The model '{spec.id}' is not served on "
                            f"{req.endpoint.path}; use {served}.")
    if req.choices > spec.max_choices:
        raise InvalidRequest(f"Too many choices: {req.choices} (n times the prompts). This "
                             f"model allows at most {spec.max_choices} per request.",
                             param="n")
    context = spec.engine.max_model_len
    for name, limit in req.token_limits().items():
        if limit >= context:
            raise InvalidRequest(f"{name} is too large: {limit}. This model's maximum context "
                                 f"length is {context} tokens, for the prompt and the "
                                 f"completion together.", param=name,
                                 code="context_length_exceeded")


class InferenceService:
    def __init__(self, specs: list[ModelSpec], router: ModelRouter, gate: Gate,
                 metrics: IngressMetrics | None = None) -> None:
        self.specs = {s.id: s for s in specs}
        self.router = router
        self.gate = gate
        self.metrics = metrics or NullMetrics()
        # how the API layer renders an error as HTTP (its one table), for the usage ledger
        self.status_of: StatusOf | None = None

    def spec(self, model: str) -> ModelSpec:
        try:
            return self.specs[model]
        except KeyError:
            raise ModelNotFound(model) from None

    async def create(self, req: InferenceRequest, api_key: str | None
                     ) -> InferenceResponse | InferenceStream:
        try:
            spec = self.spec(req.model)
            check_possible(req, spec)  # before any limit is spent on it
        except ClusterError as e:
            await self.gate.record_rejection(api_key=api_key, user=req.user, model=req.model,
                                             reason=e.code)
            self.metrics.rejected(req.model, e)
            raise
        output = req.output_limit if req.output_limit is not None else spec.default_max_tokens
        prompt, outputs = req.estimated_prompt_tokens(), req.choices * output
        try:
            admission = await self.gate.admit(
                api_key=api_key, user=req.user, model=spec, reserve_tokens=prompt + outputs,
                reserve_cost=spec.pricing.cost(prompt, outputs), endpoint=req.endpoint.value)
        except RequestTooLarge as e:  # larger than a limit: maybe than the model, too
            error = await self._context_error(req, spec) or e
            self.metrics.rejected(spec.id, error)
            raise error from None
        except ClusterError as e:
            self.metrics.rejected(spec.id, e)
            raise
        self.metrics.ongoing(spec.id, 1)  # -1 in _settle, which every path reaches
        if req.stream:
            return await self._stream(req, spec, admission)
        return await self._complete(req, spec, admission)

    async def _context_error(self, req: InferenceRequest, spec: ModelSpec) -> ClusterError | None:
        """The 400 of a request whose prompt the model's context cannot hold, from the
        engine's own count (a render with ``max_tokens: 0``, no generation); None when it
        fits or the engine cannot tell. Asked only when a TPM limit already refused it."""
        if req.choices > 1:
            return None  # the probe counts one prompt; the 429 stands for the rest
        probe = req.engine_payload() | {"max_tokens": 0, "stream": False}
        for field_name in ("max_completion_tokens", "min_tokens", "stream_options", "echo"):
            probe.pop(field_name, None)
        try:
            reply = await self.router.generate(spec.id, EngineCall(req.endpoint, probe))
        except ClusterError:
            return None
        if isinstance(reply, Rejected):
            return reply.to_error(spec.id) if reply.status == 400 else None
        prompt = int(reply.body.get("usage", {}).get("prompt_tokens", 0))
        context = spec.engine.max_model_len
        if prompt + max(1, req.output_limit or 0) <= context:
            return None
        asked = f" and max_tokens {req.output_limit}" if req.output_limit else ""
        field_name = "messages" if req.endpoint is Endpoint.chat else "prompt"
        return InvalidRequest(f"This model's maximum context length is {context} tokens. "
                              f"However, your request has {prompt} input tokens{asked}. "
                              f"Please reduce the length of the {field_name}.",
                              param=field_name, code="context_length_exceeded")

    async def _complete(self, req: InferenceRequest, spec: ModelSpec,
                        admission: Admission) -> InferenceResponse:
        tally = _Tally()
        try:
            reply = await self.router.generate(spec.id, _call(req))
            if isinstance(reply, Rejected):
                raise reply.to_error(spec.id)
            body = reply.body
            tally.mark_first_byte()
            tally.usage = body.get("usage")
            body["usage"] = self._priced(spec, tally.usage)
            tally.outcome = Outcome.ok
            return InferenceResponse(body, admission.rate)
        except Exception as e:
            raise tally.failed(_as_error(spec.id, e)) from e
        finally:
            await self._settle(req, spec, admission, tally)

    async def _stream(self, req: InferenceRequest, spec: ModelSpec,
                      admission: Admission) -> InferenceStream:
        tally = _Tally()
        items = self.router.stream(spec.id, _call(req))
        try:
            first = await anext(items)
            if isinstance(first, Rejected):
                raise first.to_error(spec.id)
        except Exception as e:
            error = tally.failed(_as_error(spec.id, e))
            await self._settle(req, spec, admission, tally)
            raise error from e

        async def unstarted() -> None:  # a no-op when the body ran: it settled itself
            if not tally.settled:
                await close(items)  # cancels the generation in the replica
                await self._settle(req, spec, admission, tally)

        return InferenceStream(self._events(req, spec, admission, items, tally), admission.rate,
                          unstarted)

    async def _events(self, req: InferenceRequest, spec: ModelSpec, admission: Admission,
                      items: AsyncIterator[StreamItem], tally: _Tally,
                      ) -> AsyncIterator[bytes | ClusterError]:
        failed = False
        coalesced = coalesce(items)
        try:
            async for received in coalesced:
                batches = [b for b in received if isinstance(b, StreamBatch)]
                failed = failed or any(b.failed for b in batches)
                if data := self._frame(req, spec, batches, tally):
                    tally.mark_first_byte()
                    yield data.encode()
            yield DONE
            tally.outcome = Outcome.error if failed else Outcome.ok
        except Exception as e:  # the replica died mid-stream: tell the client, then end
            tally.outcome = Outcome.error
            yield _as_error(spec.id, e, streaming=True)
            yield DONE
        finally:
            # Settled here, before the body's last byte, so the client's next request sees
            # it; the response settles only a body that never started.
            with anyio.CancelScope(shield=True):  # settle even when the client left
                await close(coalesced)  # closes items: cancels the replica's stream
                await self._settle(req, spec, admission, tally)

    def _frame(self, req: InferenceRequest, spec: ModelSpec, batches: list[StreamBatch],
               tally: _Tally) -> str:
        """The SSE text of some replica batches, counted, with the usage chunk priced."""
        data = "".join(b.data for b in batches)
        for b in batches:
            tally.chunks += b.chunks
            if b.usage_chunk is None:
                continue
            tally.usage = b.usage_chunk["usage"]
            if req.wants_usage_chunk:
                chunk = b.usage_chunk | {"usage": self._priced(spec, tally.usage)}
                data += f"data: {json.dumps(chunk, separators=COMPACT)}\n\n"
        return data

    def _priced(self, spec: ModelSpec, usage: Mapping[str, Any] | None) -> dict[str, Any]:
        usage = dict(usage or {})
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        cached = cached_tokens(usage)
        priced: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                  "total_tokens": prompt + completion}
        if usage.get("prompt_tokens_details") is not None:
            priced["prompt_tokens_details"] = {"cached_tokens": cached}
        priced["estimated_cost"] = spec.pricing.cost(prompt, completion, cached)
        return priced

    async def _settle(self, req: InferenceRequest, spec: ModelSpec, admission: Admission,
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
                      priced["estimated_cost"], cached_tokens(priced))
        ending = Ending(tally.outcome, status=tally.status(self.status_of),
                        latency_ms=round((time.perf_counter() - tally.started) * 1000))
        try:
            await asyncio.shield(self.gate.settle(admission, usage, ending))
        finally:  # even when cancelled while waiting for the shielded settlement
            self._record(req, spec, tally, usage)

    def _record(self, req: InferenceRequest, spec: ModelSpec, tally: _Tally, usage: Usage) -> None:
        self.metrics.ongoing(spec.id, -1)
        now = time.perf_counter()
        self.metrics.finished(RequestRecord(
            model=spec.id, error=tally.error, outcome=tally.outcome.value, stream=req.stream,
            e2e_s=now - tally.started,
            ttft_s=None if tally.first_byte is None else tally.first_byte - tally.started,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            estimated_cost=usage.estimated_cost))
