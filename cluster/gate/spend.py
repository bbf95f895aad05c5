"""Spend per key and UTC day, as settlement counts it (``settle.lua``): requests, prompt and
completion tokens, estimated cost, errors and hang-ups, under ``RedisKeys.spend_prefix``."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import cast

from pydantic import BaseModel
from redis.asyncio import Redis

from cluster.gate.keys import ANONYMOUS
from cluster.gate.redis_keys import RedisKeys


class SpendDay(BaseModel):
    key_id: str
    date: str  # UTC, ISO
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    errors: int = 0
    disconnected: int = 0


def _date(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


class SpendStore:
    def __init__(self, redis: Redis, keys: RedisKeys | None = None) -> None:
        self.redis = redis
        self.keys = keys or RedisKeys()

    async def _key_ids(self, key_id: str | None) -> list[str]:
        if key_id:
            return [key_id]
        ids = cast(set[str], await self.redis.smembers(self.keys.index()))
        return [*sorted(ids), ANONYMOUS]

    async def spend(self, key_id: str | None = None, days: int = 7) -> list[SpendDay]:
        """Per key and UTC day over the last ``days`` days, days with no traffic left out."""
        seconds, _ = await self.redis.time()
        today = int(seconds) // 86400
        wanted = [(kid, day) for kid in await self._key_ids(key_id)
                  for day in range(today - days + 1, today + 1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for kid, day in wanted:
                pipe.hgetall(f"{self.keys.spend_prefix(kid)}{day}")
            raws = await pipe.execute()
        return [self._spend_row(kid, day, raw)
                for (kid, day), raw in zip(wanted, raws, strict=True) if raw]

    @staticmethod
    def _spend_row(key_id: str, day: int, raw: dict[str, str]) -> SpendDay:
        values: dict[str, float] = defaultdict(float, {k: float(v) for k, v in raw.items()})
        return SpendDay(key_id=key_id, date=_date(day), requests=int(values["requests"]),
                        prompt_tokens=int(values["prompt_tokens"]),
                        completion_tokens=int(values["completion_tokens"]),
                        cost=round(values["cost"], 10), errors=int(values["error"]),
                        disconnected=int(values["disconnected"]))
