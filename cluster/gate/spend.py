"""Spend per key and UTC day, as settlement counts it (``settle.lua``): requests, prompt,
completion and cached tokens, estimated cost (``cost`` USD and ``cost_nano``, exact), errors
and hang-ups, under ``RedisKeys.spend_prefix``; budgets read the same hashes."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import cast

from pydantic import BaseModel
from redis.asyncio import Redis

from cluster.gate.keys import ANONYMOUS
from cluster.gate.redis_keys import RedisKeys, periods_of


class SpendDay(BaseModel):
    key_id: str
    date: str  # UTC, ISO
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: float = 0.0
    cost_nano: int = 0
    reserved_nano: int = 0  # worst cases held by requests in flight
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

    async def budget_spend(self, key_id: str, user: str = "") -> tuple[int, int]:
        """What the key (or one user of it) spent today and this month (UTC), in
        nano-dollars, as budgets count."""
        seconds, _ = await self.redis.time()
        day, month = periods_of(int(seconds))
        prefix = f"{self.keys.user_spend_prefix(key_id)}{user}:" if user \
            else self.keys.spend_prefix(key_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for period in (day, f"m{month}"):
                pipe.hget(f"{prefix}{period}", "cost_nano")
            today, this_month = await pipe.execute()
        return int(today or 0), int(this_month or 0)

    @staticmethod
    def _spend_row(key_id: str, day: int, raw: dict[str, str]) -> SpendDay:
        values: dict[str, float] = defaultdict(float, {k: float(v) for k, v in raw.items()})
        return SpendDay(key_id=key_id, date=_date(day), requests=int(values["requests"]),
                        prompt_tokens=int(values["prompt_tokens"]),
                        completion_tokens=int(values["completion_tokens"]),
                        cached_tokens=int(values["cached_tokens"]),
                        cost=round(values["cost"], 10), cost_nano=int(values["cost_nano"]),
                        reserved_nano=int(values["reserved_nano"]), errors=int(values["error"]),
                        disconnected=int(values["disconnected"]))
