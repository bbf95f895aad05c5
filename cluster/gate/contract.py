"""The contract between the ingress and whatever admits requests (keys, limits, abuse).

The ingress calls :meth:`Gate.admit` once before a request reaches an engine and
:meth:`Gate.settle` exactly once when it ends, however it ends. The Redis implementation
lives in :mod:`cluster.gate.redis_gate`; tests of the ingress may use :class:`OpenGate`.
Refusals are :mod:`cluster.errors` exceptions; nothing here knows HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from cluster.config.catalog import ModelSpec
from cluster.errors import RateLimitState


class Outcome(StrEnum):
    ok = "ok"  # the engine finished (stop or length)
    error = "error"  # the engine or the request failed after admission
    disconnected = "disconnected"  # the client left before the end


@dataclass
class Admission:
    """What admission granted; handed back to :meth:`Gate.settle`."""

    key_id: str  # a stable, non-secret id of the API key (never the key itself)
    user: str | None
    model: str
    reserved_tokens: int
    rate: RateLimitState | None = None  # the limits' state after this admission
    slot_id: str = ""  # the implementation's handle of this admission (its concurrency slot)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated_cost: float


class Gate(Protocol):
    async def admit(self, *, api_key: str | None, user: str | None, model: ModelSpec,
                    reserve_tokens: int) -> Admission:
        """Authenticate and reserve capacity, or raise a :class:`cluster.errors.ClusterError`."""
        ...

    async def settle(self, admission: Admission, usage: Usage, outcome: Outcome) -> None:
        """Settle the reservation to the real usage and release the concurrency slot."""
        ...

    async def record_rejection(self, *, api_key: str | None, user: str | None,
                               model: str, reason: str) -> None:
        """Count a request refused before or at admission (for abuse monitoring)."""
        ...

    async def close(self) -> None: ...


class OpenGate:
    """Admits everything: for unit tests of the layers above, and for `allow_anonymous` demos
    with no Redis."""

    async def admit(self, *, api_key: str | None, user: str | None, model: ModelSpec,
                    reserve_tokens: int) -> Admission:
        return Admission(key_id="anonymous", user=user, model=model.id,
                         reserved_tokens=reserve_tokens)

    async def settle(self, admission: Admission, usage: Usage, outcome: Outcome) -> None:
        return None

    async def record_rejection(self, *, api_key: str | None, user: str | None,
                               model: str, reason: str) -> None:
        return None

    async def close(self) -> None:
        return None
