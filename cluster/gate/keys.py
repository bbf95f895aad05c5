"""API keys in Redis: created with a random secret shown once; Redis keeps only its hash.

A key is ``sk-`` + 43 url-safe characters (256 random bits). Its SHA-256 identifies it: a
fast hash is right for secrets this random (no dictionary to brute-force), and lets the
admission script find the record in O(1). The public ``key_id`` is ``key_`` + the first 16
hex digits of that hash, so the ingress can name every Redis key the admission script
touches before calling it; the record keeps the full hash and the script compares it.

Nothing is cached in-process: every admission reads the record in Redis, so revoking or
blocking a key takes effect on every replica at the next request.

Record ``RedisKeys.record(key_id)`` (a hash): ``hash, key_id, name, created, revoked, blocked``
and the limits: ``rpm, tpm, max_concurrent`` (absent: the settings defaults; 0: no limit),
``user_rpm, user_tpm`` (per ``user`` value within the key; absent or 0: none), ``models``
(``,a,b,`` or absent for all models); the USD budgets ``budget_day, budget_month,
user_budget_day, user_budget_month`` in nano-dollars (absent: none; the admission script
compares integers); the abuse policy ``abuse_action`` (flag, throttle or block),
``abuse_throttle_rpm``, ``abuse_minutes`` (absent: the ``AbuseRules`` defaults; see
:mod:`cluster.gate.monitor`).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from cluster.config.settings import AbuseAction
from cluster.errors import InvalidRequest, KeyNotFound
from cluster.gate.redis_keys import RedisKeys

ANONYMOUS = "anonymous"
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrent", "user_rpm", "user_tpm")
BudgetName = Literal["day_usd", "month_usd", "user_day_usd", "user_month_usd"]
# KeyBudgets field -> record field (nano-dollars)
BUDGET_FIELDS: dict[str, str] = {"day_usd": "budget_day", "month_usd": "budget_month",
                 "user_day_usd": "user_budget_day", "user_month_usd": "user_budget_month"}
NANO = 1_000_000_000


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def key_id_of(digest: str) -> str:
    return "key_" + digest[:16]


class KeyLimits(BaseModel):
    """Per-minute limits of a key. None: the settings default (rpm, tpm, max_concurrent) or
    no limit (user_rpm, user_tpm). 0: no limit."""

    model_config = ConfigDict(strict=True)  # `false` or "5" for a limit is a 400

    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    max_concurrent: int | None = Field(None, ge=0)
    user_rpm: int | None = Field(None, ge=0)
    user_tpm: int | None = Field(None, ge=0)


class KeyBudgets(BaseModel):
    """USD budgets of a key per UTC day and calendar month (UTC), and of each ``user`` of
    the key. None: no budget. Admission reserves a request's worst-case cost against them."""

    model_config = ConfigDict(strict=True)  # strict floats take 5 and 5.0, not "5" or false

    day_usd: float | None = Field(None, ge=0, le=1e6)
    month_usd: float | None = Field(None, ge=0, le=1e6)
    user_day_usd: float | None = Field(None, ge=0, le=1e6)
    user_month_usd: float | None = Field(None, ge=0, le=1e6)

    def encoded(self) -> dict[str, str]:
        """The record fields of the budgets set (nano-dollars)."""
        return {BUDGET_FIELDS[k]: str(round(v * NANO)) for k, v in self.model_dump().items()
                if v is not None}


# AbusePolicy field -> record field
POLICY_FIELDS = {"action": "abuse_action", "throttle_rpm": "abuse_throttle_rpm",
                 "minutes": "abuse_minutes"}


class AbusePolicy(BaseModel):
    """What the abuse monitor does to a flagged user of the key: ``flag`` only records it,
    ``throttle`` limits the user to ``throttle_rpm`` requests/min and ``block`` refuses the
    user, both for ``minutes``. None: the settings default (``AbuseRules``)."""

    model_config = ConfigDict(strict=True)

    action: AbuseAction | None = None
    throttle_rpm: int | None = Field(None, ge=1)
    minutes: int | None = Field(None, ge=1)

    def encoded(self) -> tuple[dict[str, str], list[str]]:
        """(record fields to set, record fields to delete: back to the default)."""
        values = {POLICY_FIELDS[k]: v for k, v in self.model_dump().items()}
        return ({f: str(v) for f, v in values.items() if v is not None},
                [f for f, v in values.items() if v is None])


def _policy(raw: dict[str, str]) -> AbusePolicy | None:
    if not any(raw.get(f) for f in POLICY_FIELDS.values()):
        return None
    action, rpm, minutes = (raw.get(f) or None for f in POLICY_FIELDS.values())
    return AbusePolicy.model_validate(
        {"action": action, "throttle_rpm": int(rpm) if rpm else None,
         "minutes": int(minutes) if minutes else None})


class KeyRecord(BaseModel):
    key_id: str
    name: str
    created: float
    revoked: bool = False
    blocked: bool = False
    limits: KeyLimits = KeyLimits()
    budgets: KeyBudgets = KeyBudgets()
    models: list[str] | None = None  # None: every model
    policy: AbusePolicy | None = None  # None: the settings' abuse defaults


@dataclass
class CreatedKey:
    secret: str  # shown once, never stored
    record: KeyRecord = field(repr=False)


def _encode_models(models: Iterable[str] | None) -> str | None:
    if models is None:
        return None
    items = [m.strip() for m in models if m.strip()]
    if any("," in m for m in items):
        raise InvalidRequest("model ids cannot contain ','", param="models")
    return "," + ",".join(items) + "," if items else None


def _mapping(fields: dict[str, str]) -> dict[Any, Any]:
    return fields  # redis-py's Mapping type is invariant in its key type


def _decode(raw: dict[str, str]) -> KeyRecord:
    limits = KeyLimits(**{f: int(raw[f]) for f in LIMIT_FIELDS if raw.get(f, "") != ""})
    budgets = KeyBudgets(**{k: int(raw[f]) / NANO for k, f in BUDGET_FIELDS.items()
                            if raw.get(f, "") != ""})
    models = raw.get("models")
    return KeyRecord(key_id=raw["key_id"], name=raw.get("name", ""),
                     created=float(raw.get("created", 0)), revoked=raw.get("revoked") == "1",
                     blocked=raw.get("blocked") == "1", limits=limits, budgets=budgets,
                     models=[m for m in models.split(",") if m] if models else None,
                     policy=_policy(raw))


class KeyStore:
    """Create, list, revoke, limit and block keys. Talks to Redis on every call."""

    def __init__(self, redis: Redis, keys: RedisKeys | None = None) -> None:
        self.redis = redis
        self.keys = keys or RedisKeys()

    async def create(self, name: str, limits: KeyLimits | None = None,
                     models: Iterable[str] | None = None,
                     secret: str | None = None, budgets: KeyBudgets | None = None
                     ) -> CreatedKey:
        """A new key; ``secret`` imports an existing one (migrations, tests)."""
        secret = secret or "sk-" + secrets.token_urlsafe(32)
        digest = hash_key(secret)
        key_id = key_id_of(digest)
        fields = {"hash": digest, "key_id": key_id, "name": name, "created": f"{time.time():.3f}",
                  "revoked": "0", "blocked": "0"}
        fields |= {k: str(v) for k, v in (limits or KeyLimits()).model_dump().items()
                   if v is not None}
        fields |= (budgets or KeyBudgets()).encoded()
        encoded = _encode_models(models)
        if encoded:
            fields["models"] = encoded
        record = self.keys.record(key_id)
        # All or nothing, and never over an existing record (the same secret, or two keys
        # sharing a 64-bit id prefix): WATCH, check, then MULTI/EXEC.
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(record)
            if await pipe.exists(record):
                raise InvalidRequest(f"{key_id} exists (same secret, or an id collision: retry)")
            pipe.multi()
            pipe.hset(record, mapping=_mapping(fields))
            pipe.sadd(self.keys.index(), key_id)
            await pipe.execute()  # WatchError if another writer got there first
        return CreatedKey(secret=secret, record=_decode(fields))

    async def get(self, key_id: str) -> KeyRecord:
        raw = cast(dict[str, str], await self.redis.hgetall(self.keys.record(key_id)))
        if not raw or "key_id" not in raw:
            raise KeyNotFound(key_id)
        return _decode(raw)

    async def list_keys(self, include_revoked: bool = True) -> list[KeyRecord]:
        ids = sorted(cast(set[str], await self.redis.smembers(self.keys.index())))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self.keys.record(key_id))
            raws = await pipe.execute()
        records = [_decode(r) for r in raws if r and "key_id" in r]
        return [r for r in records if include_revoked or not r.revoked]

    async def _set(self, key_id: str, mapping: dict[str, str], drop: list[str] | None = None
                   ) -> KeyRecord:
        await self.get(key_id)  # raises KeyNotFound
        async with self.redis.pipeline(transaction=True) as pipe:
            if mapping:
                pipe.hset(self.keys.record(key_id), mapping=_mapping(mapping))
            if drop:
                pipe.hdel(self.keys.record(key_id), *drop)
            await pipe.execute()
        return await self.get(key_id)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Kept (for audit and spend) but refused with 401 from the next request on."""
        return await self._set(key_id, {"revoked": "1"})

    async def set_blocked(self, key_id: str, blocked: bool) -> KeyRecord:
        return await self._set(key_id, {"blocked": "1" if blocked else "0"})

    async def set_policy(self, key_id: str, policy: AbusePolicy) -> KeyRecord:
        """Replace the key's abuse policy; a field left None goes back to the default."""
        return await self._set(key_id, *policy.encoded())

    async def set_limits(self, key_id: str, limits: KeyLimits, *, clear: Iterable[str] = (),
                         models: Iterable[str] | None = None, all_models: bool = False
                         ) -> KeyRecord:
        """Set the limits given (not None); ``clear`` names limits back to their default."""
        mapping = {k: str(v) for k, v in limits.model_dump().items() if v is not None}
        drop = [f for f in clear if f in LIMIT_FIELDS]
        if all_models:
            drop.append("models")
        elif models is not None:
            encoded = _encode_models(models)
            if encoded is None:
                raise InvalidRequest("give at least one model, or all_models", param="models")
            mapping["models"] = encoded
        return await self._set(key_id, mapping, drop)


    async def set_budgets(self, key_id: str, budgets: KeyBudgets, *, clear: Iterable[str] = ()
                          ) -> KeyRecord:
        """Set the budgets given (not None); ``clear`` names budgets to remove."""
        bad = set(clear) - set(BUDGET_FIELDS)
        if bad:
            raise InvalidRequest(f"clear takes {', '.join(BUDGET_FIELDS)}", param="clear")
        return await self._set(key_id, budgets.encoded(), [BUDGET_FIELDS[c] for c in clear])


def create_key_now(redis_url: str, name: str, limits: KeyLimits | None = None,
                   models: Iterable[str] | None = None, secret: str | None = None,
                   budgets: KeyBudgets | None = None) -> CreatedKey:
    """Create a key from synchronous code (``cluster up``, test fixtures)."""
    async def create() -> CreatedKey:
        client = Redis.from_url(redis_url, decode_responses=True)
        try:
            return await KeyStore(client).create(name, limits, models, secret, budgets)
        finally:
            await client.aclose()

    return asyncio.run(create())
