"""Abuse rules, top users and blocking over activity recorded by the real scripts."""

from __future__ import annotations

import pytest

from cluster.errors import ClusterError, InvalidRequest
from cluster.gate.abuse import AbuseStore
from cluster.gate.contract import Outcome, Usage
from cluster.gate.keys import KeyLimits, KeyStore
from cluster.gate.redis_gate import RedisGate
from tests.limits_support import fresh_names, open_gate, settings, spec

pytestmark = pytest.mark.asyncio(loop_scope="session")

RULES = {"burst_factor": 3.0, "burst_window_minutes": 2, "baseline_minutes": 10,
         "burst_min_requests": 6, "window_minutes": 5, "rejected_429_threshold": 3,
         "maxlen_fraction": 0.9, "maxlen_share": 0.8, "maxlen_min_requests": 4}


async def send(gate: RedisGate, key: str, user: str, n: int, reserve: int = 10,
               used: int = 0) -> int:
    """``n`` requests settled with ``used`` tokens; the number refused."""
    refused = 0
    for _ in range(n):
        try:
            granted = await gate.admit(api_key=key, user=user, model=spec(context=1000),
                                       reserve_tokens=reserve)
        except ClusterError:
            refused += 1
            continue
        await gate.settle(granted, Usage(used, 0, 0.0), Outcome.ok)
    return refused


async def test_rules_flag_the_right_users(redis_url: str) -> None:
    names = fresh_names()
    async with open_gate(redis_url, names, settings(abuse=RULES)) as gate:
        keys = KeyStore(gate.redis, names)
        created = await keys.create("k", KeyLimits(user_rpm=4))
        key, key_id = created.secret, created.record.key_id
        abuse = AbuseStore(gate.redis, gate.conf.abuse, names)
        await seed_baseline(gate, abuse, key_id, "steady", per_minute=10)

        await send(gate, key, "spiky", 4)  # 4 requests, no history: under the minimum
        assert await abuse.flagged(key_id) == []
        await gate.record_rejection(api_key=key, user="spiky", model="m", reason="invalid_value")
        await keys.set_limits(key_id, KeyLimits(), clear=["user_rpm"])
        await send(gate, key, "spiky", 4)  # 8 in 2 min vs a baseline of 0: a burst
        await send(gate, key, "steady", 8)  # 8 in 2 min vs 10/min before: normal
        await keys.set_limits(key_id, KeyLimits(user_rpm=1))
        assert await send(gate, key, "hammer", 5) == 4  # four 429s
        assert await send(gate, key, "big", 4, reserve=950) == 3  # and max-length prompts
        await keys.set_limits(key_id, KeyLimits(), clear=["user_rpm"])
        await send(gate, key, "big", 3, reserve=950)
        await send(gate, key, "small", 5, reserve=100)

        flags = {(f.user, f.rule) for f in await abuse.flagged(key_id)}
        assert flags == {("spiky", "burst"), ("hammer", "rate_limited"),
                         ("big", "max_length"), ("big", "rate_limited")}
        everywhere = await abuse.flagged()  # every key
        assert {(f.key_id, f.user, f.rule) for f in everywhere} >= \
            {(key_id, "spiky", "burst")}


async def seed_baseline(gate: RedisGate, abuse: AbuseStore, key_id: str, user: str,
                        per_minute: int) -> None:
    """History older than the burst window, in the layout the scripts write."""
    seconds, _ = await gate.redis.time()
    now = int(seconds) // 60
    for minute in range(now - 10, now - 2):
        await gate.redis.hset(f"{abuse.keys.abuse_prefix(key_id)}{minute}",
                              f"{user}|req", per_minute)


async def test_top_users_by_tokens_and_requests(redis_url: str) -> None:
    names = fresh_names()
    async with open_gate(redis_url, names, settings()) as gate:
        created = await KeyStore(gate.redis, names).create("k")
        for user, n, used in (("a", 1, 500), ("b", 5, 10), ("c", 2, 100)):
            await send(gate, created.secret, user, n, used=used)
        abuse = AbuseStore(gate.redis, keys=names)
        by_tokens = await abuse.top_users(created.record.key_id, 60, "tokens")
        assert [(u.user, u.tokens) for u in by_tokens] == [("a", 500), ("c", 200), ("b", 50)]
        by_requests = await abuse.top_users(created.record.key_id, 60, "requests", limit=2)
        assert [(u.user, u.requests) for u in by_requests] == [("b", 5), ("c", 2)]
        with pytest.raises(InvalidRequest):
            await abuse.top_users(created.record.key_id, 60, "cost")


async def test_blocking_a_user_or_key_is_seen_by_every_replica(redis_url: str) -> None:
    names = fresh_names()
    async with open_gate(redis_url, names) as one, open_gate(redis_url, names) as two:
        created = await KeyStore(one.redis, names).create("k")
        key_id, key = created.record.key_id, created.secret
        abuse = AbuseStore(one.redis, keys=names)
        await abuse.block_user(key_id, "eve")
        assert await abuse.blocked_users(key_id) == ["eve"]
        assert await send(two, key, "eve", 1) == 1
        assert await send(two, key, "bob", 1) == 0
        await abuse.set_key_blocked(key_id, True)
        assert await send(two, key, "bob", 1) == 1
        await abuse.set_key_blocked(key_id, False)
        assert await abuse.unblock_user(key_id, "eve")
        assert await send(two, key, "eve", 1) == 0
