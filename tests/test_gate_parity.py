"""The two limiters, on the same inputs: ``admit.lua``/``settle.lua`` in a real Redis and the
in-memory fallback must reach the same decisions (codes, limits, retry times, rate state)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from cluster.gate.actions import UserAction
from cluster.gate.fallback import FallbackLimiter
from cluster.gate.keys import KeyLimits, KeyStore, hash_key, key_id_of
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.scripts import AdmitCall, Decision, KnownKey, LiveAction, Scripts, SettleCall

pytestmark = pytest.mark.asyncio(loop_scope="session")

T0 = 1_800_000_000_000  # a fixed clock (ms) for both limiters


@dataclass(frozen=True)
class Admit:
    at: int  # ms after T0
    reserve: int = 100
    user: str = ""
    model: str = "m"


@dataclass(frozen=True)
class Act:
    """The abuse monitor's live action on a user, as admission reads it."""

    user: str
    action: str
    until: int  # ms after T0
    rpm: int = 0


@dataclass(frozen=True)
class Settle:
    step: int  # the index of the admission it settles
    used: int


SEQUENCES = {
    "rpm window edge": (dict(rpm=3), 0, [Admit(0), Admit(1), Admit(2), Admit(3), Admit(59_999),
                                          Admit(60_000), Admit(60_001)]),
    "tpm with refunds": (dict(rpm=0, tpm=1000), 0, [
        Admit(0, 800), Admit(1, 800), Admit(2, 1001), Settle(0, 150), Admit(3, 800),
        Admit(4, 100), Settle(4, 0), Admit(5, 10), Admit(60_001, 900)]),
    "concurrency": (dict(rpm=0, tpm=0, max_concurrent=2), 0, [
        Admit(0), Admit(1), Admit(2), Settle(0, 10), Admit(3), Admit(4)]),
    "user scope inside a key": (dict(rpm=10, user_rpm=2, user_tpm=500), 0, [
        Admit(0, user="u"), Admit(1, user="u"), Admit(2, user="u"), Admit(3, user="v"),
        Admit(4, 450, user="v"), Admit(5), Settle(3, 0), Admit(6, 450, user="v")]),
    "global model tpm": (dict(rpm=0, tpm=0), 700, [
        Admit(0, 400), Admit(1, 400), Admit(2, 400, model="other"), Settle(0, 100),
        Admit(3, 400)]),
    "abuse actions": (dict(rpm=10, user_rpm=5), 0, [
        Act("eve", "throttle", 30_000, rpm=2), Act("mal", "block", 20_000),
        Admit(1, user="eve"), Admit(2, user="eve"), Admit(3, user="eve"), Admit(4, user="mal"),
        Admit(5, user="bob"), Admit(20_000, user="mal"), Admit(30_000, user="eve")]),
}


async def _run_lua(redis: Redis, limits: dict[str, int], model_tpm: int,
                   steps: list[Admit | Settle | Act]) -> list[Decision]:
    keys = RedisKeys(f"parity{secrets.token_hex(4)}:")
    created = await KeyStore(redis, keys).create("parity", KeyLimits(**limits))
    digest = hash_key(created.secret)
    key_id = key_id_of(digest)
    scripts, out, admitted = Scripts(redis), [], {}
    for i, step in enumerate(steps):
        if isinstance(step, Act):
            entry = UserAction(action=step.action, rpm=step.rpm, until_ms=T0 + step.until,
                               at_ms=T0)
            await redis.hset(keys.user_actions(key_id), step.user, entry.encoded())
            continue
        if isinstance(step, Settle):
            slot, d, user, model = admitted[step.step]
            scopes = d.scopes(key_id, user, model)
            await scripts.settle(SettleCall(
                slots=keys.slots(key_id), windows=[keys.window(s) for s in scopes],
                slot_id=slot, settled=keys.settled_prefix() + slot, dedupe_s=60,
                used=step.used, prompt_tokens=step.used, completion_tokens=0,
                cached_tokens=0, cost=0.0, cost_nano=0, reserved_nano=0, budget_bits=0,
                day=d.budget.day, month=d.budget.month, outcome="ok", user=user,
                key_id=key_id, model=model, endpoint="chat", status=200, latency_ms=0,
                at_ms=T0, abuse_prefix=keys.abuse_prefix(key_id), abuse_ttl_s=60,
                spend_prefix=keys.spend_prefix(key_id),
                user_spend_prefix=keys.user_spend_prefix(key_id), spend_ttl_s=60,
                ledger=keys.ledger(), ledger_retention_ms=60_000))
            continue
        slot = f"s{i}"
        d, _ = await scripts.admit(AdmitCall(
            keys=keys, key_id=key_id, digest=digest, user=step.user, model=step.model,
            reserve=step.reserve, reserve_nano=0, spend_ttl_s=60, slot_id=slot,
            default_rpm=0, default_tpm=0,
            default_max_concurrent=0, model_tpm=model_tpm, lease_ms=600_000, abuse_ttl_s=60,
            max_length=False, now_ms=T0 + step.at))
        admitted[i] = (slot, d, step.user, step.model)
        out.append(d)
    return out


def _run_fallback(limits: dict[str, int], model_tpm: int,
                  steps: list[Admit | Settle | Act]) -> list[Decision]:
    key = KnownKey("k", **{"rpm": 0, "tpm": 0, "max_concurrent": 0} | limits)
    lim, out, admitted = FallbackLimiter(lease_ms=600_000), [], {}
    for i, step in enumerate(steps):
        if isinstance(step, Act):  # what admission read from Redis before the outage
            lim.remember_action("k", step.user, LiveAction(step.action, step.rpm, step.until),
                                now=T0)
            continue
        if isinstance(step, Settle):
            slot, d, user, model = admitted[step.step]
            lim.settle(key_id="k", slot_id=slot, scopes=d.scopes("k", user, model),
                       used=step.used)
            continue
        d = lim.admit(key, user=step.user, model=step.model, reserve=step.reserve,
                      slot_id=f"s{i}", model_tpm=model_tpm, now=T0 + step.at)
        admitted[i] = (f"s{i}", d, step.user, step.model)
        out.append(d)
    return out


@pytest.mark.parametrize("name", sorted(SEQUENCES))
async def test_lua_and_fallback_decide_alike(redis_url: str, name: str) -> None:
    limits, model_tpm, steps = SEQUENCES[name]
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        lua = await _run_lua(redis, limits, model_tpm, steps)
    finally:
        await redis.aclose()
    fallback = _run_fallback(limits, model_tpm, steps)
    assert lua == fallback
    assert {d.code for d in lua} - {"ok"}, "each sequence must include a refusal"
