"""Abuse monitoring through the ``user`` field, and user/key blocking.

The admission and settlement scripts count, per key and per minute, in one hash
``{prefix}ab:{key_id}:{minute}`` (kept ``retention_minutes``) with fields ``{user}|{metric}``:
``req`` (admitted), ``tok`` (real tokens), ``rej`` and ``rej:{reason}`` (refused:
``rate_limited``, ``forbidden``, or the error code the ingress reports, e.g.
``invalid_value``), ``error`` and ``disconnected`` (outcomes), and ``maxlen`` (prompt +
max_tokens at least ``maxlen_fraction`` of the model's context).

Rules (:class:`cluster.config.settings.AbuseRules`) are evaluated off the request path:
every ``evaluate_every_s`` by the cluster's one evaluator (:mod:`cluster.gate.monitor`, which
applies each key's policy), and when an operator asks (``cluster users flagged``):

- ``burst``: a user's requests/min over the last ``burst_window_minutes`` is more than
  ``burst_factor`` x their rate over the ``baseline_minutes`` before (a baseline of at least
  one request per baseline window, so a new user is measured too), with at least
  ``burst_min_requests`` requests;
- ``rate_limited``: at least ``rejected_429_threshold`` 429s in ``window_minutes``;
- ``max_length``: at least ``maxlen_min_requests`` requests in ``window_minutes``, of which
  a share of ``maxlen_share`` or more asked for (nearly) the whole context.

Blocking a user adds it to ``{prefix}ublock:{key_id}``, which the admission script reads:
403 ``user_blocked`` on every replica from the next request. Spend: :mod:`cluster.gate.spend`.
"""

from __future__ import annotations

from typing import cast

from pydantic import BaseModel
from redis.asyncio import Redis

from cluster.config.settings import AbuseRules
from cluster.errors import InvalidRequest
from cluster.gate.keys import ANONYMOUS, KeyStore
from cluster.gate.redis_keys import RedisKeys


class UserActivity(BaseModel):
    key_id: str
    user: str  # "" when requests gave no user
    requests: int = 0
    tokens: int = 0
    rejected: int = 0
    rate_limited: int = 0  # 429s
    forbidden: int = 0  # 403s
    errors: int = 0
    disconnected: int = 0
    max_length: int = 0
    other_rejections: dict[str, int] = {}

    def add(self, metric: str, value: int) -> None:
        field = {"req": "requests", "tok": "tokens", "rej": "rejected",
                 "rej:rate_limited": "rate_limited", "rej:forbidden": "forbidden",
                 "error": "errors", "disconnected": "disconnected",
                 "maxlen": "max_length"}.get(metric)
        if field:
            setattr(self, field, getattr(self, field) + value)
        elif metric.startswith("rej:"):
            reason = metric[4:]
            self.other_rejections[reason] = self.other_rejections.get(reason, 0) + value


class Flag(BaseModel):
    key_id: str
    user: str
    rule: str  # burst | rate_limited | max_length
    detail: str


class AbuseStore:
    """Read activity, evaluate the rules, block users."""

    def __init__(self, redis: Redis, rules: AbuseRules | None = None,
                 keys: RedisKeys | None = None) -> None:
        self.redis = redis
        self.rules = rules or AbuseRules()
        self.keys = keys or RedisKeys()

    async def _now_minute(self) -> int:
        seconds, _ = await self.redis.time()  # Redis's clock, as the scripts use
        return int(seconds) // 60

    async def _buckets(self, key_id: str, first: int, last: int) -> dict[int, dict[str, str]]:
        """Minute buckets ``first..last`` (inclusive) of one key."""
        prefix = self.keys.abuse_prefix(key_id)
        minutes = list(range(first, last + 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for minute in minutes:
                pipe.hgetall(f"{prefix}{minute}")
            raws = await pipe.execute()
        return {m: cast(dict[str, str], r) for m, r in zip(minutes, raws, strict=True) if r}

    @staticmethod
    def _aggregate(key_id: str, buckets: list[dict[str, str]]) -> dict[str, UserActivity]:
        users: dict[str, UserActivity] = {}
        for bucket in buckets:
            for name, value in bucket.items():
                user, _, metric = name.rpartition("|")
                act = users.setdefault(user, UserActivity(key_id=key_id, user=user))
                act.add(metric, int(value))
        return users

    async def activity(self, key_id: str, minutes: int) -> dict[str, UserActivity]:
        """Per user of ``key_id``, over the last ``minutes`` (the current one included)."""
        now = await self._now_minute()
        buckets = await self._buckets(key_id, now - minutes + 1, now)
        return self._aggregate(key_id, list(buckets.values()))

    async def top_users(self, key_id: str, minutes: int = 60, by: str = "tokens",
                        limit: int = 10) -> list[UserActivity]:
        if by not in ("tokens", "requests", "rejected", "errors"):
            raise InvalidRequest("by: tokens, requests, rejected or errors", param="by")
        users = (await self.activity(key_id, minutes)).values()
        return sorted(users, key=lambda a: (-getattr(a, by), a.user))[:limit]

    async def _key_ids(self, key_id: str | None) -> list[str]:
        if key_id:
            return [key_id]
        ids = cast(set[str], await self.redis.smembers(self.keys.index()))
        return [*sorted(ids), ANONYMOUS]

    async def flagged(self, key_id: str | None = None) -> list[Flag]:
        """Users that break a rule now, per key (all keys when ``key_id`` is None)."""
        flags: list[Flag] = []
        for kid in await self._key_ids(key_id):
            flags.extend(await self._flag_key(kid))
        return flags

    async def _flag_key(self, key_id: str) -> list[Flag]:
        r = self.rules
        now = await self._now_minute()
        span = max(r.burst_window_minutes + r.baseline_minutes, r.window_minutes)
        buckets = await self._buckets(key_id, now - span + 1, now)

        def since(minutes: int, until: int = now) -> dict[str, UserActivity]:
            chosen = [b for m, b in buckets.items() if until - minutes < m <= until]
            return self._aggregate(key_id, chosen)

        recent = since(r.burst_window_minutes)
        baseline = since(r.baseline_minutes, now - r.burst_window_minutes)
        window = since(r.window_minutes)
        flags = [f for user, act in recent.items()
                 if (f := self._burst(key_id, user, act, baseline.get(user)))]
        for user, act in window.items():
            flags.extend(self._window_rules(key_id, user, act))
        return flags

    def _burst(self, key_id: str, user: str, recent: UserActivity,
               baseline: UserActivity | None) -> Flag | None:
        r = self.rules
        if recent.requests < r.burst_min_requests:
            return None
        rate = recent.requests / r.burst_window_minutes
        base = max(baseline.requests if baseline else 0, 1) / r.baseline_minutes
        if rate <= r.burst_factor * base:
            return None
        return Flag(key_id=key_id, user=user, rule="burst",
                    detail=f"{rate:.1f} req/min over {r.burst_window_minutes} min, "
                           f"{rate / base:.1f}x the {base:.2f} req/min of the "
                           f"{r.baseline_minutes} min before")

    def _window_rules(self, key_id: str, user: str, act: UserActivity) -> list[Flag]:
        r, out = self.rules, []
        if act.rate_limited >= r.rejected_429_threshold:
            out.append(Flag(key_id=key_id, user=user, rule="rate_limited",
                            detail=f"{act.rate_limited} requests refused with 429 in "
                                   f"{r.window_minutes} min"))
        share = act.max_length / act.requests if act.requests else 0.0
        if act.requests >= r.maxlen_min_requests and share >= r.maxlen_share:
            out.append(Flag(key_id=key_id, user=user, rule="max_length",
                            detail=f"{share:.0%} of {act.requests} requests in "
                                   f"{r.window_minutes} min asked for "
                                   f">= {r.maxlen_fraction:.0%} of the context"))
        return out

    # --- blocking: read by the admission script on every request

    async def block_user(self, key_id: str, user: str) -> None:
        await self.redis.sadd(self.keys.blocked_users(key_id), user)

    async def unblock_user(self, key_id: str, user: str) -> bool:
        return bool(await self.redis.srem(self.keys.blocked_users(key_id), user))

    async def blocked_users(self, key_id: str) -> list[str]:
        members = cast(set[str], await self.redis.smembers(self.keys.blocked_users(key_id)))
        return sorted(members)

    async def set_key_blocked(self, key_id: str, blocked: bool) -> None:
        await KeyStore(self.redis, self.keys).set_blocked(key_id, blocked)
