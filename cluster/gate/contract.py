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
    slot_id: str = ""  # the request's id: its concurrency slot and its ledger entry
    reserved_cost: float = 0.0  # USD held against budgets until settlement
    endpoint: str = "chat"  # for the ledger


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated_cost: float  # USD, a whole number of nano-dollars (see Pricing.cost_nano)
    cached_tokens: int = 0  # of prompt_tokens, served from the engine's prefix cache

    @property
    def cost_nano(self) -> int:
        return round(self.estimated_cost * 1e9)


@dataclass(frozen=True)
class Ending:
    """How an admitted request ended, for the usage ledger."""

    outcome: Outcome
    status: int = 200  # what the client got (a stream that failed midway: 200)
    latency_ms: int = 0


def ending_of(ending: Ending | Outcome) -> Ending:
    return ending if isinstance(ending, Ending) else Ending(ending)


class Gate(Protocol):
    async def admit(self, *, api_key: str | None, user: str | None, model: ModelSpec,
                    reserve_tokens: int, reserve_cost: float = 0.0,
                    endpoint: str = "chat") -> Admission:
        """Authenticate and reserve capacity (tokens, and ``reserve_cost`` USD of budget),
        or raise a :class:`cluster.errors.ClusterError`."""
        ...

    async def settle(self, admission: Admission, usage: Usage, ending: Ending | Outcome
                     ) -> None:
        """Settle the reservation to the real usage, release the concurrency slot and
        append the request to the usage ledger (once, whatever the retries)."""
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
                    reserve_tokens: int, reserve_cost: float = 0.0,
                    endpoint: str = "chat") -> Admission:
        return Admission(key_id="anonymous", user=user, model=model.id,
                         reserved_tokens=reserve_tokens, reserved_cost=reserve_cost,
                         endpoint=endpoint)

    async def settle(self, admission: Admission, usage: Usage, ending: Ending | Outcome
                     ) -> None:
        return None

    async def record_rejection(self, *, api_key: str | None, user: str | None,
                               model: str, reason: str) -> None:
        return None

    async def close(self) -> None:
        return None
