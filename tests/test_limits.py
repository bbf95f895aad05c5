"""RedisGate against a real Redis: errors, headers, reservations, slots, blocks, spend."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cluster.api.errors import error_body, error_headers, rate_headers, status_of
from cluster.errors import ClusterError, InvalidRequest
from cluster.errors import fmt_wait as fmt_duration
from cluster.gate.abuse import AbuseStore
from cluster.gate.contract import Admission, Outcome, Usage
from cluster.gate.keys import KeyLimits, KeyStore
from cluster.gate.redis_gate import RedisGate
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.spend import SpendStore
from tests.limits_support import MODEL_A, MODEL_B, open_gate, settings, spec

pytestmark = pytest.mark.asyncio(loop_scope="session")

A, B = spec(MODEL_A), spec(MODEL_B)
RESET = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


@pytest.fixture
async def gate(redis_url: str, names: RedisKeys) -> AsyncIterator[RedisGate]:
    async with open_gate(redis_url, names) as g:
        yield g


@pytest.fixture
def keys(gate: RedisGate, names: RedisKeys) -> KeyStore:
    return KeyStore(gate.redis, names)


async def refused(gate: RedisGate, key: str | None, *, user: str | None = None,
                  model: str = MODEL_A, reserve: int = 10) -> ClusterError:
    with pytest.raises(ClusterError) as info:
        await gate.admit(api_key=key, user=user, model=spec(model), reserve_tokens=reserve)
    return info.value


async def admit(gate: RedisGate, key: str | None, *, user: str | None = None,
                model: str = MODEL_A, reserve: int = 10) -> Admission:
    return await gate.admit(api_key=key, user=user, model=spec(model), reserve_tokens=reserve)


def error(exc: ClusterError) -> dict[str, object]:
    body = error_body(exc)["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


async def test_duration_format() -> None:  # async only to share the module's loop mark
    assert [fmt_duration(ms) for ms in (0, 20, 1000, 1500, 59_999, 60_000, 360_000,
                                        3_723_000)] == \
        ["0ms", "20ms", "1s", "1.5s", "59.999s", "1m0s", "6m0s", "1h2m3s"]


async def test_missing_and_unknown_key_get_401(gate: RedisGate, keys: KeyStore) -> None:
    missing = await refused(gate, None)
    assert status_of(missing) == 401
    assert error(missing)["code"] == "invalid_api_key"
    assert error(missing)["type"] == "invalid_request_error"
    real = (await keys.create("k")).secret
    forged = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    unknown = await refused(gate, forged)
    assert (status_of(unknown), error(unknown)["code"]) == (401, "invalid_api_key")
    assert forged not in unknown.message  # masked, never echoed whole


async def test_revocation_is_seen_by_another_replica_at_once(
        gate: RedisGate, keys: KeyStore, redis_url: str, names: RedisKeys) -> None:
    created = await keys.create("k")
    async with open_gate(redis_url, names) as other_replica:
        await admit(other_replica, created.secret)
        await keys.revoke(created.record.key_id)  # through the first replica's client
        exc = await refused(other_replica, created.secret)
    assert status_of(exc) == 401
    assert error(exc)["code"] == "invalid_api_key"
    assert "revoked" in exc.message
    assert (await keys.get(created.record.key_id)).revoked


async def test_blocked_key_gets_403_until_unblocked(gate: RedisGate, keys: KeyStore) -> None:
    created = await keys.create("k")
    await keys.set_blocked(created.record.key_id, True)
    exc = await refused(gate, created.secret)
    assert (status_of(exc), error(exc)["code"]) == (403, "key_blocked")
    await keys.set_blocked(created.record.key_id, False)
    assert (await admit(gate, created.secret)).key_id == created.record.key_id


async def test_blocked_user_is_refused_others_are_not(
        gate: RedisGate, keys: KeyStore, names: RedisKeys) -> None:
    created = await keys.create("k")
    abuse = AbuseStore(gate.redis, keys=names)
    await admit(gate, created.secret, user="mallory")
    await abuse.block_user(created.record.key_id, "mallory")
    exc = await refused(gate, created.secret, user="mallory")
    assert (status_of(exc), error(exc)["code"], error(exc)["param"]) == \
        (403, "user_blocked", "user")
    await admit(gate, created.secret, user="alice")
    await admit(gate, created.secret)
    assert await abuse.unblock_user(created.record.key_id, "mallory")
    await admit(gate, created.secret, user="mallory")


async def test_model_allowlist(gate: RedisGate, keys: KeyStore) -> None:
    created = await keys.create("k", models=[MODEL_A])
    await admit(gate, created.secret, model=MODEL_A)
    exc = await refused(gate, created.secret, model=MODEL_B)
    assert (status_of(exc), error(exc)["code"], error(exc)["param"]) == \
        (403, "model_not_allowed", "model")
    await keys.set_limits(created.record.key_id, KeyLimits(), all_models=True)
    await admit(gate, created.secret, model=MODEL_B)


async def test_headers_count_down(gate: RedisGate, keys: KeyStore) -> None:
    created = await keys.create("k", KeyLimits(rpm=5, tpm=1000))
    seen = [rate_headers((await admit(gate, created.secret, reserve=100)).rate) for _ in range(3)]
    assert [h["x-ratelimit-limit-requests"] for h in seen] == ["5"] * 3
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["4", "3", "2"]
    assert [h["x-ratelimit-limit-tokens"] for h in seen] == ["1000"] * 3
    assert [h["x-ratelimit-remaining-tokens"] for h in seen] == ["900", "800", "700"]
    for h in seen:
        assert RESET.match(h["x-ratelimit-reset-requests"]), h
        assert RESET.match(h["x-ratelimit-reset-tokens"]), h
    assert seen[0]["x-ratelimit-reset-requests"] == "1m0s"  # the first entry just went in


async def test_requests_429_body_and_headers(gate: RedisGate, keys: KeyStore) -> None:
    created = await keys.create("k", KeyLimits(rpm=2))
    await admit(gate, created.secret)
    await admit(gate, created.secret)
    exc = await refused(gate, created.secret)
    assert status_of(exc) == 429
    assert error(exc) == {"message": exc.message, "type": "rate_limit_exceeded",
                          "param": None, "code": "rate_limit_exceeded"}
    assert "requests per minute" in exc.message
    assert 55 <= int(error_headers(exc)["Retry-After"]) <= 60
    assert error_headers(exc)["x-ratelimit-limit-requests"] == "2"
    assert error_headers(exc)["x-ratelimit-remaining-requests"] == "0"


async def test_tokens_429_has_type_tokens(gate: RedisGate, keys: KeyStore) -> None:
    created = await keys.create("k", KeyLimits(tpm=1000))
    await admit(gate, created.secret, reserve=600)
    exc = await refused(gate, created.secret, reserve=600)
    assert (status_of(exc), error(exc)["type"], error(exc)["code"]) == \
        (429, "tokens", "rate_limit_exceeded")
    assert error_headers(exc)["x-ratelimit-remaining-tokens"] == "400"
    assert 55 <= int(error_headers(exc)["Retry-After"]) <= 60  # when the first 600 leave the window
    too_big = await refused(gate, created.secret, reserve=1001)
    assert (status_of(too_big), error(too_big)["type"]) == (429, "tokens")
    assert "too large" in too_big.message
    assert error_headers(too_big)["Retry-After"] == "1"  # waiting would not help: fail fast
    await admit(gate, created.secret, reserve=400)  # fits exactly


@pytest.mark.parametrize("outcome", list(Outcome))
async def test_reservation_settles_to_real_usage(gate: RedisGate, keys: KeyStore,
                                                 outcome: Outcome) -> None:
    created = await keys.create("k", KeyLimits(tpm=1000))
    first = await admit(gate, created.secret, reserve=800)
    assert status_of(await refused(gate, created.secret, reserve=800)) == 429
    await gate.settle(first, Usage(100, 50, 0.0), outcome)  # 800 reserved -> 150 used
    second = await admit(gate, created.secret, reserve=800)
    assert rate_headers(second.rate)["x-ratelimit-remaining-tokens"] == str(1000 - 150 - 800)


async def test_usage_over_the_reservation_is_charged(gate: RedisGate, keys: KeyStore) -> None:
    created = await keys.create("k", KeyLimits(tpm=1000))
    first = await admit(gate, created.secret, reserve=100)
    await gate.settle(first, Usage(450, 50, 0.0), Outcome.ok)  # the prompt was underestimated
    after = await admit(gate, created.secret, reserve=100)
    assert rate_headers(after.rate)["x-ratelimit-remaining-tokens"] == str(1000 - 500 - 100)


async def test_concurrency_slot_is_released_at_settlement(gate: RedisGate,
                                                          keys: KeyStore) -> None:
    created = await keys.create("k", KeyLimits(max_concurrent=1))
    running = await admit(gate, created.secret)
    exc = await refused(gate, created.secret)
    assert (status_of(exc), error(exc)["type"]) == (429, "rate_limit_exceeded")
    assert "concurrent" in exc.message
    await gate.settle(running, Usage(1, 1, 0.0), Outcome.disconnected)
    await admit(gate, created.secret)


async def test_abandoned_slot_expires_with_its_lease(redis_url: str, names: RedisKeys) -> None:
    async with open_gate(redis_url, names, settings(slot_lease_s=0.3)) as gate:
        created = await KeyStore(gate.redis, names).create("k", KeyLimits(max_concurrent=1))
        await admit(gate, created.secret)  # its replica "dies": never settled
        assert status_of(await refused(gate, created.secret)) == 429
        await asyncio.sleep(0.4)
        await admit(gate, created.secret)


async def test_per_user_limits_within_a_key(gate: RedisGate, keys: KeyStore) -> None:
    created = await keys.create("k", KeyLimits(rpm=10, user_rpm=2, user_tpm=500))
    for _ in range(2):
        await admit(gate, created.secret, user="u1")
    exc = await refused(gate, created.secret, user="u1")
    assert status_of(exc) == 429
    assert "this user" in exc.message
    assert error_headers(exc)["x-ratelimit-limit-requests"] == "2"  # the tighter scope is reported
    await admit(gate, created.secret, user="u2")
    tokens = await refused(gate, created.secret, user="u3", reserve=501)
    assert (status_of(tokens), error(tokens)["type"]) == (429, "tokens")
    await admit(gate, created.secret)  # no user: key limits only


async def test_global_tokens_per_minute_per_model(redis_url: str, names: RedisKeys) -> None:
    conf = settings(model_tpm={MODEL_A: 1000})
    async with open_gate(redis_url, names, conf) as gate:
        keys = KeyStore(gate.redis, names)
        one, two = (await keys.create("one")).secret, (await keys.create("two")).secret
        await admit(gate, one, reserve=600)
        exc = await refused(gate, two, reserve=600)
        assert (status_of(exc), error(exc)["type"]) == (429, "tokens")
        assert "all keys" in exc.message
        await admit(gate, two, model=MODEL_B, reserve=600)  # another model's pool


async def test_anonymous_only_when_allowed(redis_url: str, names: RedisKeys) -> None:
    async with open_gate(redis_url, names, settings(anonymous=True, rpm=2)) as gate:
        granted = await admit(gate, None, user="demo")
        assert granted.key_id == "anonymous"
        assert rate_headers(granted.rate)["x-ratelimit-remaining-requests"] == "1"
        unknown = await refused(gate, "sk-not-a-key-at-all-0000")
        assert status_of(unknown) == 401  # a wrong key is not anonymous
    async with open_gate(redis_url, names, settings(anonymous=False)) as gate:
        assert status_of(await refused(gate, None)) == 401


async def test_spend_per_key_and_day(gate: RedisGate, keys: KeyStore, names: RedisKeys) -> None:
    created = await keys.create("k")
    for prompt, completion, cost, outcome in ((10, 5, 0.25, Outcome.ok),
                                              (20, 0, 0.5, Outcome.error),
                                              (30, 7, 1.0, Outcome.disconnected)):
        granted = await admit(gate, created.secret, user="u")
        await gate.settle(granted, Usage(prompt, completion, cost), outcome)
    [day] = await SpendStore(gate.redis, keys=names).spend(created.record.key_id, days=2)
    assert (day.requests, day.prompt_tokens, day.completion_tokens) == (3, 60, 12)
    assert day.cost == pytest.approx(1.75)
    assert (day.errors, day.disconnected) == (1, 1)


async def test_admission_and_settlement_are_one_round_trip_each(
        gate: RedisGate, keys: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    created = await keys.create("k", KeyLimits(user_rpm=5))
    await admit(gate, created.secret, user="warm")  # scripts loaded, connection open
    sent: list[str] = []
    execute = gate.redis.execute_command

    async def counting(*args: Any, **kwargs: Any) -> Any:
        sent.append(str(args[0]))
        return await execute(*args, **kwargs)

    monkeypatch.setattr(gate.redis, "execute_command", counting)
    granted = await admit(gate, created.secret, user="u")
    assert sent == ["EVALSHA"]
    await gate.settle(granted, Usage(1, 1, 0.0), Outcome.ok)
    assert sent == ["EVALSHA", "EVALSHA"]


async def test_scripts_reload_after_script_flush(gate: RedisGate, keys: KeyStore) -> None:
    created = await keys.create("k")
    await admit(gate, created.secret)
    await gate.redis.script_flush()  # what a restarted server looks like (NOSCRIPT)
    granted = await admit(gate, created.secret)
    await gate.settle(granted, Usage(1, 1, 0.0), Outcome.ok)


async def test_rejections_are_counted_for_abuse_monitoring(
        gate: RedisGate, keys: KeyStore, names: RedisKeys) -> None:
    created = await keys.create("k", KeyLimits(rpm=1))
    await admit(gate, created.secret, user="u")
    await refused(gate, created.secret, user="u")  # 429
    await gate.record_rejection(api_key=created.secret, user="u", model=MODEL_A,
                                reason="invalid_value")
    await gate.record_rejection(api_key="sk-unknown-key-000000", user="u", model=MODEL_A,
                                reason="invalid_value")  # unknown: not charged to anyone
    act = (await AbuseStore(gate.redis, keys=names).activity(created.record.key_id, 5))["u"]
    assert (act.requests, act.rejected, act.rate_limited) == (1, 2, 1)
    assert act.other_rejections == {"invalid_value": 1}


async def test_redis_holds_only_a_hash_of_each_key(gate: RedisGate, keys: KeyStore,
                                                   names: RedisKeys) -> None:
    created = await keys.create("k", secret="sk-imported-secret-0123456789")
    granted = await admit(gate, created.secret, user="u")
    await gate.settle(granted, Usage(1, 1, 0.0), Outcome.ok)
    stored = []
    async for name in gate.redis.scan_iter(match=f"{names.prefix}*"):
        kind = await gate.redis.type(name)
        if kind == "hash":
            stored.extend([name, *(await gate.redis.hgetall(name)).items()])
        elif kind in ("set", "zset"):
            stored.extend([name, *(await gate.redis.zrange(name, 0, -1) if kind == "zset"
                                   else await gate.redis.smembers(name))])
    assert stored and "sk-imported" not in repr(stored)
    with pytest.raises(InvalidRequest):
        await keys.create("again", secret="sk-imported-secret-0123456789")
    assert [r.name for r in await keys.list_keys()] == ["k"]
