"""Abuse actions on users: the live ones that admission enforces, and the log of them all.

Live actions of a key's users are one hash ``RedisKeys.user_actions(key_id)``
(``{prefix}uact:{key_id}``), field = the ``user`` string, value = compact JSON
``{"action", "rpm", "until_ms", "rule", "at_ms"}`` (epoch ms of Redis's clock). The
admission script reads the field on every request that sends ``user`` and treats an entry
whose ``until_ms`` has passed as absent:

- ``block``: 403 ``user_blocked``;
- ``throttle``: the user's requests/min is ``rpm`` (or the key's ``user_rpm`` if lower);
- ``flag`` (the user was flagged and only recorded) and ``lifted`` (an operator lifted an
  action; the monitor leaves the user alone until ``until_ms``): ignored by admission, they
  are the monitor's memory, so that a flag is recorded once and a lift holds.

A live entry is never replaced by a weaker one (flag < throttle < block) nor while lifted:
the writes are Lua snippets that compare before they set, so an operator's lift and the
monitor's next evaluation cannot undo each other.

Every action taken (``flagged``, ``throttled``, ``blocked``), ended (``expired``) or lifted
(``lifted``) is appended, in the same script as the change, to the stream
``RedisKeys.abuse_actions()`` (trimmed to about :data:`MAX_ENTRIES`) with its reason, key,
user, until and actor (``monitor:<replica>`` or the operator); :class:`ActionLog` reads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Literal, cast

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import WatchError

from cluster.config.settings import AbuseRules
from cluster.gate.redis_keys import RedisKeys

MAX_ENTRIES = 100_000  # the stream is trimmed (approximately) past this
PAGE = 500  # stream entries read per call when filtering by key

LiveKind = Literal["flag", "throttle", "block", "lifted"]
Event = Literal["flagged", "throttled", "blocked", "expired", "lifted"]
EVENT_OF: dict[str, Event] = {"flag": "flagged", "throttle": "throttled", "block": "blocked",
                              "lifted": "lifted"}
LIFTABLE = ("throttle", "block")

# KEYS: the uact hash, the stream. ARGV: user, new value, its action, now_ms, maxlen, then
# the stream entry's field/value pairs. 1 if applied, 0 if a live entry as strong (or a
# lift) is there.
_APPLY = """
local rank = {flag = 1, throttle = 2, block = 3}
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, e = pcall(cjson.decode, cur)
  if ok and type(e) == 'table' and (tonumber(e.until_ms) or 0) > tonumber(ARGV[4]) then
    if e.action == 'lifted' or (rank[e.action] or 0) >= rank[ARGV[3]] then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 6))
return 1
"""

# KEYS: the uact hash, the stream. ARGV: user, the value seen, record (1/0), maxlen, then
# the stream entry's pairs. Deletes the entry only if it is still the one seen.
_EXPIRE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[3] == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
end
return 1
"""


class UserAction(BaseModel):
    """One live entry of the uact hash (the contract with the admission script)."""

    action: LiveKind
    rpm: int = 0  # throttle only
    until_ms: int
    rule: str = ""
    at_ms: int

    def encoded(self) -> str:
        return json.dumps(self.model_dump(), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> UserAction | None:
        try:
            return cls.model_validate_json(raw)
        except ValueError:
            return None

    def live(self, now_ms: int) -> bool:
        return self.until_ms > now_ms


class ActionEntry(BaseModel):
    """One entry of the actions stream."""

    id: str = ""  # the stream id (set when read)
    at_ms: int
    key_id: str
    user: str
    action: Event
    rule: str = ""
    detail: str = ""
    until_ms: int = 0
    rpm: int = 0
    actor: str
    live: bool = False  # when read: the entry is the user's live action now

    def fields(self) -> list[str]:
        data = self.model_dump(exclude={"id", "live"})
        return [str(x) for k, v in data.items() for x in (k, v)]

    @classmethod
    def of(cls, entry_id: str, fields: dict[str, str]) -> ActionEntry:
        return cls.model_validate({"id": entry_id, **fields})


def lift_hold_minutes(rules: AbuseRules) -> int:
    """How long a lifted user is left alone: the rules' longest window, so that the activity
    that flagged the user has left it when the monitor looks again."""
    return max(rules.burst_window_minutes, rules.window_minutes)


async def now_ms(redis: Redis) -> int:
    """Redis's clock, as the admission script reads it."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


class UserActions:
    """Read, apply, expire and lift the live actions of users (uact hashes)."""

    def __init__(self, redis: Redis, keys: RedisKeys | None = None) -> None:
        self.redis = redis
        self.keys = keys or RedisKeys()
        self._apply = redis.register_script(_APPLY)
        self._expire = redis.register_script(_EXPIRE)

    async def of_keys(self, key_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """Raw entries per key id: {key_id: {user: JSON}} (keys without any left out)."""
        ids = list(key_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self.keys.user_actions(key_id))
            raws = await pipe.execute()
        return {k: cast(dict[str, str], r) for k, r in zip(ids, raws, strict=True) if r}

    async def get(self, key_id: str, user: str) -> UserAction | None:
        raw = await self.redis.hget(self.keys.user_actions(key_id), user)
        return UserAction.decode(_s(raw)) if raw else None

    async def apply(self, key_id: str, user: str, action: UserAction, entry: ActionEntry,
                    now: int) -> bool:
        """Set ``action`` and log ``entry``, unless the user has a live action as strong or
        a live lift."""
        done = await self._apply(
            keys=[self.keys.user_actions(key_id), self.keys.abuse_actions()],
            args=[user, action.encoded(), action.action, now, MAX_ENTRIES, *entry.fields()])
        return bool(done)

    async def expire(self, key_id: str, user: str, seen: str,
                     entry: ActionEntry | None) -> bool:
        """Delete the entry ``seen`` (unless it changed since) and log ``entry`` if given."""
        pairs = entry.fields() if entry else []
        done = await self._expire(
            keys=[self.keys.user_actions(key_id), self.keys.abuse_actions()],
            args=[user, seen, "1" if entry else "0", MAX_ENTRIES, *pairs])
        return bool(done)

    async def lift(self, key_id: str, user: str, actor: str, hold_minutes: int
                   ) -> ActionEntry | None:
        """Lift a live throttle or block: the entry becomes ``lifted`` for ``hold_minutes``
        (the monitor does not act on the user meanwhile) and the lift is logged. None when
        the user has no live throttle or block."""
        name = self.keys.user_actions(key_id)
        for _ in range(5):  # WATCH: retried if the monitor writes the same hash meanwhile
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(name)
                    raw = await pipe.hget(name, user)
                    now = await now_ms(pipe)
                    cur = UserAction.decode(_s(raw)) if raw else None
                    if cur is None or not cur.live(now) or cur.action not in LIFTABLE:
                        return None
                    hold = UserAction(action="lifted", until_ms=now + hold_minutes * 60_000,
                                      rule=cur.rule, at_ms=now)
                    entry = ActionEntry(at_ms=now, key_id=key_id, user=user, action="lifted",
                                        rule=cur.rule, detail=f"{cur.action} lifted",
                                        until_ms=hold.until_ms, rpm=cur.rpm, actor=actor)
                    pipe.multi()
                    pipe.hset(name, user, hold.encoded())
                    pipe.xadd(self.keys.abuse_actions(), _pairs(entry), maxlen=MAX_ENTRIES,
                              approximate=True)
                    await pipe.execute()
                    return entry
            except WatchError:
                continue
        raise WatchError(f"the actions of {key_id} kept changing; try again")


def _pairs(entry: ActionEntry) -> dict[Any, Any]:
    flat = entry.fields()
    return dict(zip(flat[::2], flat[1::2], strict=True))


class ActionLog:
    """Read the actions stream, newest first, with which entries are live now."""

    def __init__(self, redis: Redis, keys: RedisKeys | None = None) -> None:
        self.redis = redis
        self.keys = keys or RedisKeys()

    async def recent(self, key_id: str | None = None, limit: int = 50) -> list[ActionEntry]:
        entries: list[ActionEntry] = []
        upper = "+"
        while len(entries) < limit:
            count = PAGE if key_id else limit - len(entries)
            raw = await self.redis.xrevrange(self.keys.abuse_actions(), max=upper, count=count)
            for entry_id, fields in raw or []:
                entry = ActionEntry.of(_s(entry_id),
                                       {_s(k): _s(v) for k, v in (fields or {}).items()})
                if key_id in (None, entry.key_id):
                    entries.append(entry)
            if not raw or len(raw) < count:
                break
            upper = "(" + _s(raw[-1][0])
        entries = entries[:limit]
        await self._mark_live(entries)
        return entries

    async def _mark_live(self, entries: list[ActionEntry]) -> None:
        if not entries:
            return
        live = await UserActions(self.redis, self.keys).of_keys({e.key_id for e in entries})
        now = await now_ms(self.redis)
        for e in entries:
            raw = live.get(e.key_id, {}).get(e.user)
            cur = UserAction.decode(raw) if raw else None
            e.live = bool(cur and cur.live(now) and cur.at_ms == e.at_ms
                          and EVENT_OF[cur.action] == e.action)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
