"""Budgets of one named ``user`` of a key, in place of the key's budgets for each of its
users (``KeyBudgets.user_day_usd``/``user_month_usd``): a customer on a larger plan, or a
tighter cap on one user. Kept in a hash user -> JSON under ``RedisKeys.user_budgets``, which
``admit.lua`` reads in the same round trip as the rest; a period left unset (None) keeps
the key's budget for it."""

from __future__ import annotations

import json
from typing import cast

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from cluster.gate.keys import NANO, KeyRecord
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.spend import SpendStore


def _nano(usd: float | None) -> int | None:
    return None if usd is None else round(usd * NANO)


class UserBudget(BaseModel):
    """One user's budgets per UTC day and calendar month. None: the key's per-user one."""

    model_config = ConfigDict(strict=True)

    day_usd: float | None = Field(None, ge=0, le=1e6)
    month_usd: float | None = Field(None, ge=0, le=1e6)

    def encoded(self) -> str:
        """The hash value admit.lua reads: nano-dollars, null for the key's budget."""
        return json.dumps({"day": _nano(self.day_usd), "month": _nano(self.month_usd)},
                          separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> UserBudget:
        got = json.loads(raw)
        return cls(**{f"{p}_usd": None if got.get(p) is None else got[p] / NANO
                      for p in ("day", "month")})

    @property
    def empty(self) -> bool:
        return self.day_usd is None and self.month_usd is None


class UserBudgetState(BaseModel):
    """A user's budgets in force (its own, else the key's per-user ones; None: none) and
    what the user spent today and this month (UTC), as admission counts them."""

    key_id: str
    user: str
    own: UserBudget | None = Field(description="the user's own budgets, if any")
    day_usd: float | None
    month_usd: float | None
    spent_today_usd: float
    spent_this_month_usd: float


class UserBudgets:
    def __init__(self, redis: Redis, keys: RedisKeys | None = None) -> None:
        self.redis = redis
        self.keys = keys or RedisKeys()

    async def set(self, key_id: str, user: str, budget: UserBudget) -> None:
        """Give the user these budgets; with neither set, the key's apply again."""
        name = self.keys.user_budgets(key_id)
        if budget.empty:
            await self.redis.hdel(name, user)
        else:
            await self.redis.hset(name, user, budget.encoded())

    async def get(self, key_id: str, user: str) -> UserBudget | None:
        raw = cast(str | None, await self.redis.hget(self.keys.user_budgets(key_id), user))
        return None if raw is None else UserBudget.decode(raw)

    async def all(self, key_id: str) -> dict[str, UserBudget]:
        raw = cast(dict[str, str], await self.redis.hgetall(self.keys.user_budgets(key_id)))
        return {user: UserBudget.decode(v) for user, v in sorted(raw.items())}

    async def states(self, record: KeyRecord) -> list[UserBudgetState]:
        """Every user of the key with budgets of their own."""
        return [await self.state(record, user, own)
                for user, own in (await self.all(record.key_id)).items()]

    async def state(self, record: KeyRecord, user: str,
                    own: UserBudget | None = None) -> UserBudgetState:
        """``own``: the user's own budgets when the caller read them already."""
        own = own or await self.get(record.key_id, user)
        today, month = await SpendStore(self.redis, self.keys).budget_spend(record.key_id, user)
        key = record.budgets
        return UserBudgetState(
            key_id=record.key_id, user=user, own=own,
            day_usd=own.day_usd if own and own.day_usd is not None else key.user_day_usd,
            month_usd=own.month_usd if own and own.month_usd is not None
            else key.user_month_usd,
            spent_today_usd=today / NANO, spent_this_month_usd=month / NANO)
