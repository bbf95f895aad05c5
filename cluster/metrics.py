"""What the ingress reports about each request. The Ray-metrics exporter lives here too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, as the ingress saw it."""

    model: str
    status: int  # HTTP status sent (200 for a stream that started, even if it failed later)
    outcome: str  # ok | error | disconnected
    stream: bool
    e2e_s: float
    ttft_s: float | None  # time to the first content byte (streams and non-streams alike)
    prompt_tokens: int
    completion_tokens: int
    estimated_cost: float


class IngressMetrics(Protocol):
    def ongoing(self, model: str, delta: int) -> None: ...

    def finished(self, record: RequestRecord) -> None: ...

    def rejected(self, model: str, reason: str) -> None: ...


class NullMetrics:
    def ongoing(self, model: str, delta: int) -> None:
        return None

    def finished(self, record: RequestRecord) -> None:
        return None

    def rejected(self, model: str, reason: str) -> None:
        return None
