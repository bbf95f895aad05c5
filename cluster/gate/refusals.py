"""A refused :class:`~cluster.gate.scripts.Decision` as the domain error a client gets,
with the message OpenAI's API would send for the same refusal."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from cluster.errors import (
    ClusterError,
    Forbidden,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    TokensRateLimited,
    Unauthenticated,
    fmt_wait,
)
from cluster.gate.scripts import Decision

NO_KEY = ("You didn't provide an API key. You need to provide your API key in an "
          "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
WHERE = {"key": "this API key", "user": "this user", "model": "this model (all keys)",
         "throttled": "this user (throttled by abuse monitoring)"}
PERIOD = {"day": "daily", "month": "monthly"}


def redact(api_key: str) -> str:
    """What may be shown of a key (error messages; never logs of the whole key)."""
    return f"{api_key[:3]}...{api_key[-4:]}" if len(api_key) > 12 else "***"


def refusal(d: Decision, api_key: str, model_id: str, reserve: int,
            reserve_cost: float = 0.0) -> ClusterError:
    if d.code == "invalid_api_key":
        return Unauthenticated(f"Incorrect API key provided: {redact(api_key)}.")
    if d.code == "revoked":
        return Unauthenticated("This API key has been revoked.")
    if d.code == "key_blocked":
        return Forbidden("This API key is blocked.", code="key_blocked")
    if d.code == "user_blocked":
        until = f" for {fmt_wait(d.retry_ms)} (abuse monitoring)" if d.retry_ms else ""
        return Forbidden(f"This user is blocked for this API key{until}.", code="user_blocked",
                         param="user")
    if d.code == "budget":
        return over_budget(d, reserve_cost)
    if d.code == "model_not_allowed":
        return Forbidden(f"This API key may not use the model '{model_id}'.",
                         code="model_not_allowed", param="model")
    return rate_limited(d, reserve)


def over_budget(d: Decision, reserve_cost: float) -> QuotaExceeded:
    """OpenAI's 429 ``insufficient_quota``, with the budget, what is spent and the reset."""
    reset = datetime.fromtimestamp(time.time() + d.retry_ms / 1000, UTC)
    reset_at = reset.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    if d.limit < 0:  # the in-memory limiter (Redis unreachable) knows only what is left
        return QuotaExceeded(
            f"You exceeded your current quota: what is left of the budget of "
            f"{WHERE[d.scope]} does not cover this request (up to ${reserve_cost:.6f}). "
            f"It resets at {reset_at} (in {fmt_wait(d.retry_ms)}).",
            retry_after_s=d.retry_ms / 1000)
    return QuotaExceeded(
        f"You exceeded your current quota: the {PERIOD[d.period]} budget of "
        f"{WHERE[d.scope]} is ${d.limit / 1e9:.6f}, of which ${d.used / 1e9:.6f} is spent or "
        f"held by requests in flight, and this request may cost up to ${reserve_cost:.6f}. "
        f"It resets at {reset_at} (in {fmt_wait(d.retry_ms)}).",
        retry_after_s=d.retry_ms / 1000)


def rate_limited(d: Decision, reserve: int) -> RateLimited:
    kind = {"too_large": RequestTooLarge, "tokens": TokensRateLimited}.get(d.code, RateLimited)
    return kind(_rate_message(d, reserve), retry_after_s=d.retry_ms / 1000, rate=d.rate)


def _rate_message(d: Decision, reserve: int) -> str:
    wait, where = fmt_wait(d.retry_ms), WHERE.get(d.scope, d.scope)
    if d.code == "requests":
        return (f"Rate limit reached for requests per minute (RPM) on {where}: Limit "
                f"{d.limit}, Used {d.used}, Requested 1. Please try again in {wait}.")
    if d.code == "tokens":
        return (f"Rate limit reached for tokens per minute (TPM) on {where}: Limit "
                f"{d.limit}, Used {d.used}, Requested {reserve}. Please try again in {wait}.")
    if d.code == "too_large":
        return (f"Request too large for tokens per minute (TPM) on {where}: Limit "
                f"{d.limit}, Requested {reserve} (prompt + max_tokens). Reduce the prompt "
                f"or max_tokens.")
    return (f"Too many concurrent requests on {where}: Limit {d.limit}. Please try again "
            f"when a request finishes.")
