"""The abuse monitor through the real stack: two ingress replicas, one evaluator (the lease
holder), a bursting user throttled by the key's policy while a calm one is served.

The stack's settings (conftest) evaluate every 2 s and flag a burst from 10 requests."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import httpx
from redis.asyncio import Redis
from typer.testing import CliRunner

from cluster.gate.actions import ActionEntry, ActionLog
from cluster.gate.keys import AbusePolicy, KeyStore, hash_key, key_id_of
from cluster.gate.redis_keys import RedisKeys
from cluster.tools.cli import app
from cluster.tools.stack import LocalStack
from tests.integration.conftest import TINY_A, create_key

ASK = {"model": TINY_A, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
PERIOD_S = 2.0


def post(stack: LocalStack, key: str, user: str) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=ASK | {"user": user},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


async def _with_redis(url: str, policy: AbusePolicy | None, key_id: str
                      ) -> tuple[list[ActionEntry], str | None]:
    client = Redis.from_url(url, decode_responses=True)
    try:
        if policy is not None:
            await KeyStore(client).set_policy(key_id, policy)
        leader = cast(str | None, await client.get(RedisKeys().abuse_leader()))
        return await ActionLog(client).recent(key_id), leader
    finally:
        await client.aclose()


def actions(stack: LocalStack, key_id: str, policy: AbusePolicy | None = None
            ) -> tuple[list[ActionEntry], str | None]:
    """The key's recorded actions (after setting ``policy``), and the lease holder."""
    assert stack.redis_url is not None
    return asyncio.run(_with_redis(stack.redis_url, policy, key_id))


def test_a_bursting_user_is_throttled_and_a_calm_one_is_not(stack: LocalStack) -> None:
    key = create_key(stack, "abuse-e2e", rpm=10_000, tpm=0)
    key_id = key_id_of(hash_key(key))
    _, leader = actions(stack, key_id, AbusePolicy(action="throttle", throttle_rpm=2,
                                                   minutes=30))
    assert leader is not None and "Ingress#" in leader, leader  # one replica holds the lease

    for _ in range(15):
        assert post(stack, key, "burst").status_code == 200
    for _ in range(2):
        assert post(stack, key, "calm").status_code == 200

    deadline = time.monotonic() + 2 * PERIOD_S + 4  # two periods, plus Serve's slack
    throttled: list[ActionEntry] = []
    while not throttled and time.monotonic() < deadline:
        time.sleep(0.25)
        throttled = [e for e in actions(stack, key_id)[0] if e.action == "throttled"]
    assert throttled, "no throttle within two evaluation periods"
    [entry] = throttled
    assert (entry.user, entry.rule, entry.rpm, entry.live) == ("burst", "burst", 2, True)
    assert entry.actor.startswith("monitor:")

    # the user window starts with the throttle: at most its 2 requests/min, then 429
    statuses = [post(stack, key, "burst").status_code for _ in range(3)]
    assert statuses[-1] == 429 and statuses.count(200) <= 2, statuses
    refused = post(stack, key, "burst")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["Retry-After"]) >= 1
    assert post(stack, key, "calm").status_code == 200
    assert all(e.user != "calm" for e in actions(stack, key_id)[0])

    shown = CliRunner().invoke(app, ["users", "actions", "--key", key_id],
                               env={"CLUSTER_REDIS_URL": stack.redis_url or "",
                                    "COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "burst" in line)
    assert "throttled" in row and "live" in row

    lifted = CliRunner().invoke(app, ["users", "lift", key_id, "burst"],
                                env={"CLUSTER_REDIS_URL": stack.redis_url or ""})
    assert lifted.exit_code == 0 and "lifted" in lifted.output
    assert post(stack, key, "burst").status_code == 200  # served again at once
