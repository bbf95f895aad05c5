"""The one table from domain errors to HTTP, and the engine's refusals as domain errors."""

from __future__ import annotations

import json

import pytest

from cluster import errors as e
from cluster.api.errors import HTTP, error_body, error_event, error_headers, http_of, status_of
from cluster.serving.messages import Rejected


def kinds(base: type[e.ClusterError]) -> set[type[e.ClusterError]]:
    found = {base}
    for sub in base.__subclasses__():
        found |= kinds(sub)
    return found


def test_every_kind_has_a_row_or_inherits_one() -> None:
    for kind in kinds(e.ClusterError):
        assert any(k in HTTP for k in kind.__mro__), kind


@pytest.mark.parametrize(("error", "status", "kind", "code"), [
    (e.InvalidRequest("bad", param="top_p"), 400, "invalid_request_error", "invalid_request"),
    (e.Unauthenticated("who?"), 401, "invalid_request_error", "invalid_api_key"),
    (e.Forbidden("no", code="user_blocked"), 403, "invalid_request_error", "user_blocked"),
    (e.ModelNotFound("x/y"), 404, "invalid_request_error", "model_not_found"),
    (e.KeyNotFound("key_1"), 404, "invalid_request_error", "key_not_found"),
    (e.RateLimited("slow", retry_after_s=2.5), 429, "rate_limit_exceeded", "rate_limit_exceeded"),
    (e.TokensRateLimited("tpm"), 429, "tokens", "rate_limit_exceeded"),
    (e.StoreUnavailable(), 503, "service_unavailable", "service_unavailable"),
    (e.ModelOverloaded("busy", retry_after_s=3), 503, "service_unavailable", "model_overloaded"),
    (e.EngineFailed("boom"), 500, "internal_error", "internal_error"),
])
def test_the_table(error: e.ClusterError, status: int, kind: str, code: str) -> None:
    assert http_of(error) == (status, kind) and status_of(error) == status
    body = error_body(error)["error"]
    assert body == {"message": error.message, "type": kind, "param": error.param, "code": code}
    event = error_event(error).decode()
    assert event.startswith("data: ") and json.loads(event[6:]) == error_body(error)


def test_retry_and_rate_headers() -> None:
    assert error_headers(e.RateLimited("slow", retry_after_s=2.5))["Retry-After"] == "3"
    assert error_headers(e.StoreUnavailable())["Retry-After"] == "1"
    assert "Retry-After" not in error_headers(e.InvalidRequest("bad"))
    rate = e.RateLimitState(limit_requests=10, remaining_requests=0, reset_requests_ms=1500)
    headers = error_headers(e.RateLimited("slow", retry_after_s=1, rate=rate))
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-reset-requests"] == "1.5s"
    assert "x-ratelimit-limit-tokens" not in headers  # no token limit: no token headers


@pytest.mark.parametrize(("rejected", "kind", "status"), [
    (Rejected(400, "too long", "messages", "BadRequestError"), e.InvalidRequest, 400),
    (Rejected(404, "no such model", None, "NotFoundError"), e.ModelNotFound, 404),
    (Rejected(500, "engine died", None, "InternalServerError"), e.EngineFailed, 500),
])
def test_engine_refusals(rejected: Rejected, kind: type[e.ClusterError], status: int) -> None:
    error = rejected.to_error("m")
    assert type(error) is kind and status_of(error) == status
    assert error.message == rejected.message
