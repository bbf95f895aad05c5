"""Keys, rate limits and blocks through the real stack (two ingress replicas, real Redis)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import openai
import pytest
from ray import serve

from cluster.config.serve_options import APP_NAME, INGRESS_NAME
from cluster.tools.stack import LocalStack
from tests.integration.conftest import SESSION_KEY, TINY_A, TINY_B, create_key

ASK = {"model": TINY_A, "max_tokens": 1,
       "messages": [{"role": "user", "content": "Hello there"}]}


def sdk_for(stack: LocalStack, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=retries,
                         timeout=60)


def post(stack: LocalStack, key: str | None, body: dict[str, object]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=headers,
                      timeout=60)


def test_missing_and_unknown_keys_are_401(stack: LocalStack) -> None:
    for key in (None, "sk-not-a-key"):
        r = post(stack, key, ASK)
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        sdk_for(stack, "sk-not-a-key").chat.completions.create(**ASK)  # type: ignore[call-overload]


def test_model_allowlist_is_403(stack: LocalStack) -> None:
    key = create_key(stack, "only-a", models=[TINY_A])
    assert post(stack, key, ASK).status_code == 200
    with pytest.raises(openai.PermissionDeniedError) as err:
        sdk_for(stack, key).chat.completions.create(**(ASK | {"model": TINY_B}))  # type: ignore[call-overload]
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "model_not_allowed"


def test_request_headers_count_down_then_429(stack: LocalStack) -> None:
    key = create_key(stack, "rpm3", rpm=3, tpm=0)
    remaining = []
    for _ in range(3):
        r = post(stack, key, ASK)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert "x-ratelimit-reset-requests" in r.headers
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    r = post(stack, key, ASK)
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    err = r.json()["error"]
    assert err["type"] == "rate_limit_exceeded" and err["code"] == "rate_limit_exceeded"
    assert err["param"] is None
    with pytest.raises(openai.RateLimitError):
        sdk_for(stack, key).chat.completions.create(**ASK)  # type: ignore[call-overload]


def test_headers_come_before_the_first_sse_byte(stack: LocalStack) -> None:
    key = create_key(stack, "stream-headers", rpm=10, tpm=100_000)
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", timeout=60,
                      json=ASK | {"stream": True, "max_tokens": 3},
                      headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.headers["x-ratelimit-remaining-requests"] == "9"
        assert int(r.headers["x-ratelimit-remaining-tokens"]) < 100_000
        events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "data: [DONE]"


def probe(stack: LocalStack, key: str) -> tuple[int, int]:
    """(remaining tokens after this request's reservation, this request's real use)."""
    r = post(stack, key, ASK)
    assert r.status_code == 200, r.text
    return int(r.headers["x-ratelimit-remaining-tokens"]), r.json()["usage"]["total_tokens"]


def test_tokens_settle_to_real_usage_after_a_stream(stack: LocalStack) -> None:
    key = create_key(stack, "tpm-stream", rpm=100, tpm=100_000)
    first, first_used = probe(stack, key)
    # 200 tokens reserved, but the stop string ends it after one token
    r = post(stack, key, ASK | {"stream": True, "max_tokens": 200, "stop": ["\n"],
                                "temperature": 0,
                                "stream_options": {"include_usage": True}})
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: {")]
    stream_used = json.loads(events[-1])["usage"]["total_tokens"]
    assert stream_used < 100
    second, _ = probe(stack, key)
    assert first - second == first_used + stream_used  # charged exactly what was used


def test_disconnect_settles_and_frees_the_slot(stack: LocalStack) -> None:
    key = create_key(stack, "hang-up", rpm=100, tpm=1_000_000, max_concurrent=1)
    body = ASK | {"max_tokens": 900, "stream": True, "model": TINY_B}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        reserved_left = int(r.headers["x-ratelimit-remaining-tokens"])
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 5
    while True:  # the slot comes back once the ingress has settled
        after = post(stack, key, ASK)
        if after.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after.status_code == 200, after.text
    # 900 tokens were reserved; only the prompt and a few delivered tokens stay charged
    charged = 1_000_000 - int(after.headers["x-ratelimit-remaining-tokens"])
    assert charged < 1_000_000 - reserved_left


def test_concurrency_429_is_retried_by_the_sdk(stack: LocalStack) -> None:
    from concurrent.futures import ThreadPoolExecutor

    key = create_key(stack, "one-at-a-time", rpm=100, tpm=0, max_concurrent=1)
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", timeout=60,
                          json=ASK | {"max_tokens": 900, "stream": True, "model": TINY_B},
                          headers={"Authorization": f"Bearer {key}"}) as busy:
            assert busy.status_code == 200
            lines = busy.iter_lines()
            next(lines)
            r = post(stack, key, ASK)
            assert r.status_code == 429, (r.text, r.headers)
            assert int(r.headers["Retry-After"]) >= 1
            # the SDK gets a 429 too, waits Retry-After, and retries...
            retried = pool.submit(sdk_for(stack, key, retries=3).chat.completions.create,
                                  **ASK)
            time.sleep(0.5)
        # ...and gets through once the stream above has hung up and freed the slot
        done = retried.result(timeout=60)
    assert done.choices[0].finish_reason == "length"


def test_blocked_user_is_refused_at_once(stack: LocalStack) -> None:
    from redis.asyncio import Redis

    from cluster.gate.abuse import AbuseStore
    from cluster.gate.keys import hash_key, key_id_of

    key = create_key(stack, "users", rpm=100)
    assert post(stack, key, ASK | {"user": "mallory"}).status_code == 200

    async def block() -> None:
        client = Redis.from_url(stack.redis_url or "", decode_responses=True)
        try:
            await AbuseStore(client).block_user(key_id_of(hash_key(key)), "mallory")
        finally:
            await client.aclose()

    asyncio.run(block())
    r = post(stack, key, ASK | {"user": "mallory"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "user_blocked"
    assert post(stack, key, ASK | {"user": "alice"}).status_code == 200


def test_exactly_the_limit_is_admitted_across_two_ingress_replicas(stack: LocalStack) -> None:
    status = serve.status().applications[APP_NAME].deployments[INGRESS_NAME]
    assert status.replica_states.get("RUNNING") == 2
    key = create_key(stack, "exact", rpm=50, tpm=0, max_concurrent=0)

    async def burst() -> Counter[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=120,
                                     limits=limits) as client:
            rs = await asyncio.gather(*(client.post(
                "/v1/chat/completions", json=ASK,
                headers={"Authorization": f"Bearer {key}"}) for _ in range(200)))
        return Counter(r.status_code for r in rs)

    assert asyncio.run(burst()) == {200: 50, 429: 150}


def test_redis_outage_fails_closed_then_recovers(stack: LocalStack, api_key: str) -> None:
    assert stack.redis is not None
    stack.redis.stop()
    try:
        r = post(stack, api_key, ASK)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "service_unavailable"
    finally:
        stack.redis.start()
    # Redis came back empty (no persistence in tests): restore the session key
    create_key(stack, "integration", secret=SESSION_KEY)
    deadline, in_a_row = time.monotonic() + 15, 0
    while in_a_row < 10 and time.monotonic() < deadline:  # every ingress replica is back
        r = post(stack, api_key, ASK)
        in_a_row = in_a_row + 1 if r.status_code == 200 else 0
        time.sleep(0.1)
    assert in_a_row == 10, r.text
    assert httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 200


def test_a_prompt_past_the_context_is_400_not_the_tpm_429(stack: LocalStack) -> None:
    """The request can never be served, whatever the key's limits: vLLM's count says so."""
    key = create_key(stack, "tpm-small", rpm=100, tpm=200)
    long = ASK | {"messages": [{"role": "user", "content": "hello " * 1500}]}  # context 1024
    r = post(stack, key, long)
    assert r.status_code == 400, r.text
    assert "context length" in r.json()["error"]["message"]
    small = post(stack, key, ASK | {"messages": [{"role": "user", "content": "hi " * 300}]})
    assert small.status_code == 429 and "too large" in small.json()["error"]["message"]
