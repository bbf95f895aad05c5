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
(``,a,b,`` or absent for all models).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from cluster.errors import InvalidRequest, KeyNotFound
from cluster.gate.redis_keys import RedisKeys

ANONYMOUS = "anonymous"
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrent", "user_rpm", "user_tpm")


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


class KeyRecord(BaseModel):
    key_id: str
    name: str
    created: float
    revoked: bool = False
    blocked: bool = False
    limits: KeyLimits = KeyLimits()
    models: list[str] | None = None  # None: every model


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
    models = raw.get("models")
    return KeyRecord(key_id=raw["key_id"], name=raw.get("name", ""),
                     created=float(raw.get("created", 0)), revoked=raw.get("revoked") == "1",
                     blocked=raw.get("blocked") == "1", limits=limits,
                     models=[m for m in models.split(",") if m] if models else None)


class KeyStore:
    """Create, list, revoke, limit and block keys. Talks to Redis on every call."""

    def __init__(self, redis: Redis, keys: RedisKeys | None = None) -> None:
        self.redis = redis
        self.keys = keys or RedisKeys()

    async def create(self, name: str, limits: KeyLimits | None = None,
                     models: Iterable[str] | None = None,
                     secret: str | None = None) -> CreatedKey:
        """A new key; ``secret`` imports an existing one (migrations, tests)."""
        secret = secret or "sk-" + secrets.token_urlsafe(32)
        digest = hash_key(secret)
        key_id = key_id_of(digest)
        fields = {"hash": digest, "key_id": key_id, "name": name, "created": f"{time.time():.3f}",
                  "revoked": "0", "blocked": "0"}
        fields |= {k: str(v) for k, v in (limits or KeyLimits()).model_dump().items()
                   if v is not None}
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


def create_key_now(redis_url: str, name: str, limits: KeyLimits | None = None,
                   models: Iterable[str] | None = None, secret: str | None = None) -> CreatedKey:
    """Create a key from synchronous code (``cluster up``, test fixtures)."""
    async def create() -> CreatedKey:
        client = Redis.from_url(redis_url, decode_responses=True)
        try:
            return await KeyStore(client).create(name, limits, models, secret)
        finally:
            await client.aclose()

    return asyncio.run(create())
