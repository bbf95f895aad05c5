"""USD budgets (reserved at admission, settled to the real cost), the usage ledger and the
settlements kept through a Redis outage, against a real Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest

from cluster.api.errors import error_body, error_headers, status_of
from cluster.config.settings import LedgerSettings, RedisFailMode
from cluster.errors import ClusterError, QuotaExceeded
from cluster.gate.contract import Admission, Ending, Outcome, Usage
from cluster.gate.keys import KeyBudgets, KeyLimits, KeyStore
from cluster.gate.ledger import UsageLedger
from cluster.gate.redis_gate import RedisAdmission, RedisGate
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.spend import SpendStore
from cluster.gate.user_budgets import UserBudget, UserBudgets
from cluster.tools.redis_server import RedisServer
from tests.limits_support import RACE_TIMEOUT_S, open_gate, settings, spec, warm

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = spec()  # $1 per million input tokens, $2 per million output tokens
UNLIMITED = KeyLimits(rpm=0, tpm=0, max_concurrent=0)
# 10 prompt tokens + 5 output tokens = 10 x 1000 + 5 x 2000 nano-dollars
COST = MODEL.pricing.cost(10, 5)
SECRET = "sk-budget-outage-key-0123456789abcdefghijklmn"


@pytest.fixture
async def gate(redis_url: str, names: RedisKeys) -> AsyncIterator[RedisGate]:
    async with open_gate(redis_url, names) as g:
        yield g


async def make_key(gate: RedisGate, names: RedisKeys, secret: str | None = None,
                   **budgets: float) -> tuple[str, str]:
    created = await KeyStore(gate.redis, names).create("k", UNLIMITED, secret=secret,
                                                       budgets=KeyBudgets(**budgets))
    return created.secret, created.record.key_id


async def admit(gate: RedisGate, key: str, user: str | None = None) -> Admission:
    return await gate.admit(api_key=key, user=user, model=MODEL, reserve_tokens=15,
                            reserve_cost=COST)


async def admitted(gate: RedisGate, key: str, user: str | None = None) -> bool:
    try:
        await admit(gate, key, user)
    except QuotaExceeded:
        return False
    return True


def until_midnight_s() -> float:
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return (midnight - now).total_seconds()


async def test_cost_is_exact_in_nano_dollars() -> None:
    assert MODEL.pricing.cost_nano(10, 5) == 20_000 and COST == 2e-05


async def test_a_spent_day_budget_is_openais_insufficient_quota_with_its_reset(
        gate: RedisGate, names: RedisKeys) -> None:
    key, _ = await make_key(gate, names, day_usd=3 * COST)
    assert [await admitted(gate, key) for _ in range(4)] == [True, True, True, False]
    with pytest.raises(ClusterError) as info:
        await admit(gate, key)
    e = info.value
    assert status_of(e) == 429
    body = error_body(e)["error"]
    assert (body["type"], body["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "daily budget of this API key" in body["message"] and "resets at" in body["message"]
    headers = error_headers(e)
    assert headers["x-should-retry"] == "false"  # the openai SDK must not retry it
    assert abs(int(headers["Retry-After"]) - until_midnight_s()) < 5


async def test_settlement_replaces_the_reservation_with_the_real_cost(
        gate: RedisGate, names: RedisKeys) -> None:
    key, key_id = await make_key(gate, names, day_usd=2 * COST)
    first, second = await admit(gate, key), await admit(gate, key)
    assert not await admitted(gate, key)  # both worst cases held
    await gate.settle(first, Usage(10, 0, MODEL.pricing.cost(10, 0)), Outcome.ok)
    await gate.settle(second, Usage(10, 0, MODEL.pricing.cost(10, 0)), Outcome.disconnected)
    # 2 x 10_000 nano spent of 40_000: two more worst cases do not fit, one does
    assert [await admitted(gate, key) for _ in range(2)] == [True, False]
    [day] = await SpendStore(gate.redis, keys=names).spend(key_id, days=1)
    assert day.cost == pytest.approx(2e-05)


async def test_user_budgets_hold_per_user_within_the_key(gate: RedisGate, names: RedisKeys
                                                         ) -> None:
    key, _ = await make_key(gate, names, user_day_usd=COST, month_usd=100 * COST)
    assert [await admitted(gate, key, "alice") for _ in range(2)] == [True, False]
    with pytest.raises(QuotaExceeded) as info:
        await admit(gate, key, "alice")
    assert "daily budget of this user" in info.value.message
    assert await admitted(gate, key, "bob")
    assert await admitted(gate, key)  # no user: only the key's budgets apply


async def test_a_users_own_budgets_replace_the_keys_per_user_ones(
        gate: RedisGate, names: RedisKeys) -> None:
    key, key_id = await make_key(gate, names, user_day_usd=2 * COST, user_month_usd=50 * COST)
    own = UserBudgets(gate.redis, names)
    await own.set(key_id, "big", UserBudget(day_usd=4 * COST))  # the key's month budget
    await own.set(key_id, "small", UserBudget(month_usd=COST))
    assert [await admitted(gate, key, "big") for _ in range(5)] == [True] * 4 + [False]
    with pytest.raises(QuotaExceeded) as info:
        await admit(gate, key, "small")
        await admit(gate, key, "small")
    assert "monthly budget of this user" in info.value.message
    assert [await admitted(gate, key, "plain") for _ in range(3)] == [True, True, False]

    state = await own.state(await KeyStore(gate.redis, names).get(key_id), "big")
    assert (state.day_usd, state.month_usd) == (4 * COST, 50 * COST)
    assert state.own == UserBudget(day_usd=4 * COST) and state.spent_today_usd == 0
    await own.set(key_id, "small", UserBudget())  # removed: the key's budgets again
    assert await own.all(key_id) == {"big": UserBudget(day_usd=4 * COST)}
    assert await admitted(gate, key, "small")


async def test_a_month_budget_resets_on_the_first_of_next_month(
        gate: RedisGate, names: RedisKeys) -> None:
    key, _ = await make_key(gate, names, month_usd=COST)
    await admit(gate, key)
    with pytest.raises(QuotaExceeded) as info:
        await admit(gate, key)
    now = dt.datetime.now(dt.UTC)
    first = dt.date(now.year + now.month // 12, now.month % 12 + 1, 1)
    assert f"resets at {first.isoformat()}T00:00:00Z" in info.value.message
    assert "monthly budget" in info.value.message


async def test_two_replicas_admit_exactly_what_the_budget_covers(
        redis_url: str, names: RedisKeys) -> None:
    conf = settings(redis_timeout_s=RACE_TIMEOUT_S)
    async with open_gate(redis_url, names, conf) as one, open_gate(redis_url, names, conf) as two:
        key, _ = await make_key(one, names, day_usd=50 * COST)
        await asyncio.gather(warm(one, 100), warm(two, 100))
        tries = [admitted(g, key, f"u{i % 7}") for i in range(100) for g in (one, two)]
        results = await asyncio.gather(*tries)
    assert sum(results) == 50


async def test_each_settlement_is_in_the_ledger_once_and_reconciles(
        gate: RedisGate, names: RedisKeys) -> None:
    key, key_id = await make_key(gate, names)
    usages = [Usage(10, 5, COST), Usage(7, 0, MODEL.pricing.cost(7, 0, 3), cached_tokens=3),
              Usage(3, 1, MODEL.pricing.cost(3, 1))]
    for usage, outcome in zip(usages, (Outcome.ok, Outcome.error, Outcome.disconnected),
                              strict=True):
        granted = await admit(gate, key, "alice")
        await gate.settle(granted, usage, Ending(outcome, status=200, latency_ms=12))
        await gate.settle(granted, usage, Ending(outcome))  # a retry: applied once
    ledger = UsageLedger(gate.redis, names)
    entries = [e async for e in ledger.entries(0, 2**62)]
    assert len(entries) == 3 and len({e.request_id for e in entries}) == 3
    assert [e.outcome for e in entries] == ["ok", "error", "disconnected"]
    assert [e.cached_tokens for e in entries] == [0, 3, 0]
    assert all(e.key_id == key_id and e.user == "alice" and e.latency_ms == 12
               for e in entries)
    [day] = await SpendStore(gate.redis, keys=names).spend(key_id, days=1)
    total_nano = sum(u.cost_nano for u in usages)
    assert sum(e.cost_nano for e in entries) == total_nano == day.cost_nano
    assert abs(sum(e.cost for e in entries) - day.cost) < 1e-6
    assert day.requests == 3 and day.cached_tokens == 3
    # a user's spend is kept as long as its budgets need it; a key's for reports
    user_hashes = [k async for k in gate.redis.scan_iter(
        match=f"{names.user_spend_prefix(key_id)}alice:*")]
    ttls = sorted([await gate.redis.ttl(k) for k in user_hashes])
    assert len(ttls) == 2 and 0 < ttls[0] <= 2 * 86400 < ttls[1] <= 62 * 86400
    assert await gate.redis.ttl(f"{names.spend_prefix(key_id)}{entries[0].ts // 86_400_000}") \
        > 300 * 86400


async def test_ledger_pages_by_cursor_and_range(gate: RedisGate, names: RedisKeys) -> None:
    key, key_id = await make_key(gate, names)
    for _ in range(5):
        await gate.settle(await admit(gate, key), Usage(1, 1, 0.0), Outcome.ok)
    ledger = UsageLedger(gate.redis, names)
    first = await ledger.page(0, 2**62, limit=2)
    assert len(first.entries) == 2 and first.next_cursor == first.entries[-1].id
    rest = await ledger.page(0, 2**62, cursor=first.next_cursor, limit=10)
    assert len(rest.entries) == 3 and rest.next_cursor is None
    assert {e.id for e in first.entries}.isdisjoint(e.id for e in rest.entries)
    cut = int(rest.entries[0].id.split("-")[0])
    assert all(int(e.id.split("-")[0]) < cut
               for e in (await ledger.page(0, cut)).entries)
    other = await ledger.page(0, 2**62, key_id="key_someone_else")
    assert other.entries == [] and key_id


async def test_settlements_during_an_outage_reach_the_ledger_when_redis_returns(
        server: RedisServer, names: RedisKeys) -> None:
    conf = settings(fail_mode=RedisFailMode.open, redis_retry_s=0.1)
    async with open_gate(server.url, names, conf) as gate:
        key, key_id = await make_key(gate, names, SECRET, day_usd=1.0)
        before = [await admit(gate, key) for _ in range(2)]
        server.stop()  # (its data is gone when it restarts: the key is made again)
        during = await admit(gate, key)  # fail open: admitted in memory
        assert isinstance(during, RedisAdmission) and during.in_memory
        for granted in (*before, during):
            await gate.settle(granted, Usage(10, 5, COST), Outcome.ok)
        assert gate.pending_settlements == 3
        server.start()
        await make_key(gate, names, SECRET, day_usd=1.0)
        await asyncio.sleep(0.15)
        await admit(gate, key)  # Redis answers again: the kept settlements are resent
        for _ in range(50):
            if gate.pending_settlements == 0:
                break
            await asyncio.sleep(0.05)
        assert gate.stats.settlements_resent == 3 and gate.stats.settlements_dropped == 0
        entries = [e async for e in UsageLedger(gate.redis, names).entries(0, 2**62)]
        assert len(entries) == 3
        [day] = await SpendStore(gate.redis, keys=names).spend(key_id, days=1)
        assert day.cost_nano == 3 * 20_000


async def test_fail_open_spends_down_what_redis_last_said_was_left(
        server: RedisServer, names: RedisKeys) -> None:
    conf = settings(fail_mode=RedisFailMode.open, redis_retry_s=60)
    async with open_gate(server.url, names, conf) as gate:
        key, _ = await make_key(gate, names, SECRET, day_usd=3 * COST, user_day_usd=2 * COST)
        await admit(gate, key, "alice")  # Redis: 2 x COST left for the key, 1 for alice
        server.stop()
        assert await admitted(gate, key, "alice")  # in memory: alice's last one
        with pytest.raises(QuotaExceeded) as info:
            await admit(gate, key, "alice")
        assert "this user" in info.value.message and error_headers(info.value)[
            "x-should-retry"] == "false"
        assert await admitted(gate, key, "bob")  # the key's last one
        assert not await admitted(gate, key, "carol")
        assert gate.stats.fallback_admissions == 2


async def test_fail_closed_refuses_budgeted_keys_too(server: RedisServer, names: RedisKeys
                                                     ) -> None:
    async with open_gate(server.url, names, settings(redis_retry_s=60)) as gate:
        key, _ = await make_key(gate, names, SECRET, day_usd=1.0)
        await admit(gate, key)
        server.stop()
        with pytest.raises(ClusterError) as info:
            await admit(gate, key)
        assert status_of(info.value) == 503


async def test_the_ledger_is_trimmed_by_age(redis_url: str, names: RedisKeys) -> None:
    conf = settings().model_copy(update={"ledger": LedgerSettings(retention_days=1e-8)})
    async with open_gate(redis_url, names, conf) as gate:  # keeps about a millisecond
        key, _ = await make_key(gate, names)
        for _ in range(250):
            await gate.settle(await admit(gate, key), Usage(1, 1, 0.0), Outcome.ok)
        # XADD MINID ~ drops whole stream nodes (100 entries) once all are past the age
        assert await gate.redis.xlen(names.ledger()) < 250
        async with open_gate(redis_url, names) as keeping:  # the default: 35 days
            before = await keeping.redis.xlen(names.ledger())
            for _ in range(250):
                await keeping.settle(await admit(keeping, key), Usage(1, 1, 0.0), Outcome.ok)
            assert await keeping.redis.xlen(names.ledger()) == before + 250


async def test_past_pending_max_the_oldest_kept_settlements_are_dropped_and_counted(
        server: RedisServer, names: RedisKeys) -> None:
    conf = settings(fail_mode=RedisFailMode.open, redis_retry_s=0.1).model_copy(
        update={"ledger": LedgerSettings(pending_max=2)})
    async with open_gate(server.url, names, conf) as gate:
        key, _ = await make_key(gate, names, SECRET)
        granted = [await admit(gate, key, f"u{i}") for i in range(3)]
        server.stop()
        for g in granted:
            await gate.settle(g, Usage(10, 5, COST), Outcome.ok)
        assert gate.pending_settlements == 2 and gate.stats.settlements_dropped == 1
        server.start()
        await make_key(gate, names, SECRET)
        await asyncio.sleep(0.15)
        assert await gate.flush_pending() == 2
        entries = [e async for e in UsageLedger(gate.redis, names).entries(0, 2**62)]
        assert sorted(e.user for e in entries) == ["u1", "u2"]  # u0, the oldest, was dropped
