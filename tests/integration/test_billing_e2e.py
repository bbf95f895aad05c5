"""Budgets, the usage ledger and cached-token pricing through the real stack: two ingress
replicas, real Redis, vLLM on the CPU (issue 10, points 1-3)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections import Counter
from typing import Any

import httpx
import pytest
from redis import Redis

from cluster.gate.keys import KeyBudgets, KeyLimits, create_key_now
from cluster.gate.ledger import LedgerEntry
from cluster.gate.redis_keys import RedisKeys
from cluster.tools.stack import LocalStack
from tests.integration.conftest import TINY_A, TINY_B
from tests.integration.test_metrics import EXPORT_WAIT_S, name, scrape, total, wait_for

UNLIMITED = KeyLimits(rpm=0, tpm=0, max_concurrent=0)
# tiny-a: $1.5 per million prompt tokens, $3 per million completion tokens (conftest)
PROMPT = [100 + i for i in range(10)]  # token ids: the gate's estimate is exact
ONE_REQUEST_NANO = 10 * 1500 + 1 * 3000


def new_key(stack: LocalStack, name: str, **budgets: float) -> tuple[str, str]:
    assert stack.redis_url is not None
    created = create_key_now(stack.redis_url, name, UNLIMITED, budgets=KeyBudgets(**budgets))
    return created.secret, created.record.key_id


def ledger(stack: LocalStack, key_id: str | None = None, model: str | None = None
           ) -> list[LedgerEntry]:
    assert stack.redis_url is not None
    with Redis.from_url(stack.redis_url, decode_responses=True) as r:
        raw: Any = r.xrange(RedisKeys().ledger())
    entries = [LedgerEntry.model_validate({"id": i, **f}) for i, f in raw]
    return [e for e in entries if (key_id is None or e.key_id == key_id)
            and (model is None or e.model == model)]


def spend_hash(stack: LocalStack, key_id: str, period: str = "day") -> dict[str, str]:
    """The key's spend today or this month (UTC), as budgets read it."""
    today = dt.datetime.now(dt.UTC).date()
    suffix = str((today - dt.date(1970, 1, 1)).days) if period == "day" else \
        f"m{today.year * 12 + today.month - 1}"
    assert stack.redis_url is not None
    with Redis.from_url(stack.redis_url, decode_responses=True) as r:
        got: Any = r.hgetall(RedisKeys().spend_prefix(key_id) + suffix)
    assert got, f"no spend for {key_id} ({period})"
    return dict(got)


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def many(stack: LocalStack, key: str, n: int) -> list[httpx.Response]:
    body = {"model": TINY_A, "prompt": PROMPT, "max_tokens": 1}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers(key), timeout=120,
                                 limits=limits) as client:
        return list(await asyncio.gather(*(client.post("/v1/completions", json=body)
                                           for _ in range(n))))


def test_200_concurrent_requests_against_a_budget_for_50_admit_exactly_50(
        stack: LocalStack) -> None:
    key, key_id = new_key(stack, "budget-50", day_usd=50 * ONE_REQUEST_NANO / 1e9)
    replies = asyncio.run(many(stack, key, 200))
    assert Counter(r.status_code for r in replies) == {200: 50, 429: 150}
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert refused.json()["error"]["type"] == "insufficient_quota"
    assert refused.headers["x-should-retry"] == "false" and "resets at" in refused.text
    served = [r.json()["usage"] for r in replies if r.status_code == 200]
    assert {(u["prompt_tokens"], u["completion_tokens"]) for u in served} == {(10, 1)}
    day = spend_hash(stack, key_id)
    assert int(day["cost_nano"]) == 50 * ONE_REQUEST_NANO  # the budget, to the nano-dollar
    assert int(day["reserved_nano"]) == 0  # every reservation settled
    entries = ledger(stack, key_id)
    assert len(entries) == 50 and len({e.request_id for e in entries}) == 50


def stream_lines(stack: LocalStack, key: str, body: dict[str, Any], keep: int | None = None
                 ) -> list[str]:
    """The SSE data lines of a streamed request; ``keep``: hang up after that many."""
    got: list[str] = []
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body,
                      headers=headers(key), timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(line[6:])
            if keep is not None and len(got) >= keep:
                break
    return got


def test_streamed_failed_and_disconnected_requests_settle_to_what_they_used(
        stack: LocalStack) -> None:
    key, key_id = new_key(stack, "endings", day_usd=1.0, user_month_usd=1.0)
    ask = {"model": TINY_A, "user": "carol", "messages": [{"role": "user", "content": "Hi"}]}
    lines = stream_lines(stack, key, ask | {"max_tokens": 5, "stream": True,
                                             "stream_options": {"include_usage": True},
                                             "ignore_eos": True})
    usage = json.loads(lines[-2])["usage"]
    # hangs up after three data lines, long before 900 tokens (however deltas merge)
    stream_lines(stack, key, ask | {"max_tokens": 900, "stream": True, "ignore_eos": True},
                 keep=3)
    too_long = httpx.post(f"{stack.base_url}/v1/completions", headers=headers(key), json={
        "model": TINY_A, "prompt": [7] * 1100, "max_tokens": 1}, timeout=60)
    assert too_long.status_code == 400

    def settled() -> bool:
        return len(ledger(stack, key_id)) == 3
    wait_for(settled, 30, "three ledger entries")
    # the hang-up settles when the server notices it: the order is not the clients'
    by_outcome = {e.outcome: e for e in ledger(stack, key_id)}
    streamed, left, failed = (by_outcome[o] for o in ("ok", "disconnected", "error"))
    assert (streamed.outcome, streamed.status, streamed.user) == ("ok", 200, "carol")
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (
        usage["prompt_tokens"], usage["completion_tokens"])
    assert streamed.cost == pytest.approx(usage["estimated_cost"], abs=1e-12)
    assert left.outcome == "disconnected" and 1 <= left.completion_tokens < 900
    assert (failed.outcome, failed.status, failed.cost_nano) == ("error", 400, 0)
    day = spend_hash(stack, key_id)
    assert int(day["reserved_nano"]) == 0
    assert int(day["cost_nano"]) == sum(e.cost_nano for e in (streamed, left, failed))


def test_cached_prompt_tokens_are_priced_lower_and_in_the_ledger(stack: LocalStack) -> None:
    key, key_id = new_key(stack, "cached")
    body = {"model": TINY_B, "prompt": [300 + (i % 500) for i in range(600)],
            "max_tokens": 1}
    first, second = (httpx.post(f"{stack.base_url}/v1/completions", headers=headers(key),
                                json=body, timeout=60).json()["usage"] for _ in range(2))
    assert first["prompt_tokens"] == second["prompt_tokens"] == 600
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and first["prompt_tokens_details"]["cached_tokens"] < cached
    # tiny-b: $1.5 per million prompt tokens, $0.3 for cached ones, $3 for completion
    assert second["estimated_cost"] == pytest.approx(
        ((600 - cached) * 1.5 + cached * 0.3 + 3.0) / 1e6, abs=1e-12)
    assert second["estimated_cost"] < first["estimated_cost"]
    wait_for(lambda: len(ledger(stack, key_id)) == 2, 30, "two ledger entries")
    assert [e.cached_tokens for e in ledger(stack, key_id)][-1] == cached


def test_the_ledger_reconciles_with_spend_and_prometheus(stack: LocalStack) -> None:
    """Every tiny-b request of the session is in the ledger once; its costs add up to the
    spend counters and to the Prometheus cost counter, to the micro-dollar."""
    key, key_id = new_key(stack, "reconcile")
    for i in range(3):
        r = httpx.post(f"{stack.base_url}/v1/chat/completions", headers=headers(key),
                       json={"model": TINY_B, "max_tokens": 3 + i, "user": f"u{i}",
                             "messages": [{"role": "user", "content": f"Count {i}"}]},
                       timeout=60)
        assert r.status_code == 200
    mine = ledger(stack, key_id)
    assert len(mine) == 3
    day, month = spend_hash(stack, key_id), spend_hash(stack, key_id, "month")
    assert int(day["cost_nano"]) == int(month["cost_nano"]) == sum(e.cost_nano for e in mine)
    assert abs(float(day["cost"]) - sum(e.cost for e in mine)) < 1e-6
    cost_metric = name("llm_ingress_estimated_cost_usd", "_total")
    expected = sum(e.cost for e in ledger(stack, model=TINY_B))
    seen: list[float] = []

    def exported() -> bool:
        seen.append(total(scrape(stack.metrics_url), cost_metric, model=TINY_B))
        return abs(seen[-1] - expected) < 1e-6
    wait_for(exported, EXPORT_WAIT_S, f"the cost counter to reach {expected} (saw {seen[-3:]})")
