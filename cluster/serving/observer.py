"""What the chat service reports about each request: the interface its metrics implement
(:class:`cluster.api.metrics.RayIngressMetrics` exports them through Ray)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cluster.errors import ClusterError


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, as the ingress saw it."""

    model: str
    error: ClusterError | None  # what the client got instead of a 200 (None: a 200, which
    # a stream that failed after it began still is)
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

    def rejected(self, model: str, error: ClusterError) -> None: ...


class NullMetrics:
    def ongoing(self, model: str, delta: int) -> None:
        return None

    def finished(self, record: RequestRecord) -> None:
        return None

    def rejected(self, model: str, error: ClusterError) -> None:
        return None
