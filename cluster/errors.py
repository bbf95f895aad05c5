"""Every refusal and failure a client can meet, as the domain names them.

Raised by every layer (the gate, serving, the stores) and free of HTTP: the API layer turns
them into OpenAI error bodies and statuses with one table (:mod:`cluster.api.errors`),
which the admin API, the CLI's messages and the metrics' status labels use too.

Each kind has a default ``code`` (OpenAI's machine-readable ``error.code``); a raise may
give a finer one (``key_blocked``, ``model_overloaded``, ...). ``retry_after_s`` says when a
retry can succeed (a 429 or 503 then carries ``Retry-After``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimitState:
    """The most constrained scope's request and token windows (-1: no such limit), for the
    ``x-ratelimit-*`` figures of a response or a refusal."""

    limit_requests: int = -1
    remaining_requests: int = -1
    reset_requests_ms: int = 0
    limit_tokens: int = -1
    remaining_tokens: int = -1
    reset_tokens_ms: int = 0


def fmt_wait(ms: int) -> str:
    """A wait as OpenAI's messages and reset headers spell it: ``20ms``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    minutes, ms_left = divmod(ms, 60_000)
    seconds = f"{ms_left / 1000:.3f}".rstrip("0").rstrip(".")
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


class ClusterError(Exception):
    code = "error"
    # False: waiting cannot help soon, so clients must not retry (``x-should-retry: false``,
    # which the openai SDK and the clients built on it obey); None: their own judgement.
    should_retry: bool | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None, rate: RateLimitState | None = None
                 ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s
        self.rate = rate


class InvalidRequest(ClusterError):
    """The request can never succeed as sent (a bad field, too long for the model)."""

    code = "invalid_request"


class Unauthenticated(ClusterError):
    code = "invalid_api_key"


class Forbidden(ClusterError):
    """Authenticated, but not allowed (blocked key or user, model not allowed)."""

    code = "permission_denied"


class NotFound(ClusterError):
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str, message: str | None = None) -> None:
        super().__init__(message or f"The model '{model}' does not exist or is not served "
                         "here.", param="model")


class KeyNotFound(NotFound):
    code = "key_not_found"

    def __init__(self, key_id: str) -> None:
        super().__init__(f"No API key with id {key_id!r}.", param="key_id")
        self.key_id = key_id


class RateLimited(ClusterError):
    """Over a requests-per-minute or concurrency limit; waiting ``retry_after_s`` helps."""

    code = "rate_limit_exceeded"


class TokensRateLimited(RateLimited):
    """Over a tokens-per-minute limit (or larger than it: then waiting cannot help)."""


class RequestTooLarge(TokensRateLimited):
    """Larger than a tokens-per-minute limit: waiting cannot help (OpenAI answers 429)."""


class QuotaExceeded(ClusterError):
    """A USD budget (per key or per user, per day or month) is spent until its period
    resets; ``retry_after_s`` is that reset."""

    code = "insufficient_quota"
    should_retry = False


class Unavailable(ClusterError):
    """A dependency cannot serve now (the limits store, a model's replicas); retry."""

    code = "service_unavailable"


class StoreUnavailable(Unavailable):
    """The limits store (Redis) is unreachable."""

    def __init__(self, message: str = "The limits store (Redis) is unreachable.") -> None:
        super().__init__(message, retry_after_s=1)


class ModelUnavailable(Unavailable):
    code = "model_unavailable"


class ModelOverloaded(Unavailable):
    code = "model_overloaded"


class EngineFailed(ClusterError):
    """The engine (or the replica holding it) failed on an admitted request."""

    code = "internal_error"

    @classmethod
    def of(cls, model: str, exc: BaseException, *, streaming: bool = False) -> EngineFailed:
        when = " while streaming" if streaming else ""
        return cls(f"The model '{model}' failed{when}: {type(exc).__name__}")
