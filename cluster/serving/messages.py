"""The typed messages between a model replica and the ingress (pickled by Ray Serve).

The ingress sends an :class:`EngineCall`. ``generate`` answers :class:`Completion` or
:class:`Rejected`. ``stream`` yields first
:class:`StreamOpened` or :class:`Rejected` (so the ingress can still answer 4xx before it
starts the SSE response), then :class:`StreamBatch` items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.config.catalog import Endpoint
from cluster.errors import ClusterError, EngineFailed, InvalidRequest, ModelNotFound


@dataclass(frozen=True, slots=True)
class EngineCall:
    """One request for the engine: which OpenAI API, and its validated body."""

    endpoint: Endpoint
    payload: dict[str, Any]

    def with_fields(self, **fields: Any) -> EngineCall:
        return EngineCall(self.endpoint, self.payload | fields)


@dataclass(frozen=True, slots=True)
class Rejected:
    """The engine refused the request: vLLM's ``ErrorResponse`` (status, its error type such
    as ``BadRequestError``, message, the offending field)."""

    status: int
    message: str
    param: str | None = None
    kind: str = ""

    def to_error(self, model: str) -> ClusterError:
        if self.status == 404 or self.kind == "NotFoundError":
            return ModelNotFound(model, message=self.message)
        if self.status >= 500:
            return EngineFailed(self.message)
        return InvalidRequest(self.message, param=self.param)


@dataclass(frozen=True, slots=True)
class Completion:
    body: dict[str, Any]  # the engine's chat.completion or text_completion, usage included


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The engine accepted the stream; batches follow."""


@dataclass(frozen=True, slots=True)
class StreamBatch:
    """One or more SSE events of a stream, coalesced when the ingress lags."""

    data: str  # the SSE text of the chunks
    chunks: int  # how many chunks ``data`` holds
    usage_chunk: dict[str, Any] | None = None  # the engine's final usage-only chunk, once
    failed: bool = False  # ``data`` holds an error event


Reply = Completion | Rejected
StreamItem = StreamOpened | Rejected | StreamBatch
