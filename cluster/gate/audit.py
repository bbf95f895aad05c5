"""The audit log of admin actions, and the lockout of clients that guess the admin key.

Every change an operator makes (a key created, revoked, blocked, its limits changed, a user
blocked), through the admin API or the CLI, is appended to one Redis Stream with who, what
and when; ``cluster audit`` reads it. Refused admin requests are appended too, and a client
with too many of them in a window is refused for the rest of it, right key or not.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis

from cluster.gate.redis_keys import RedisKeys

MAX_ENTRIES = 100_000  # the stream is trimmed (approximately) past this


class AuditEntry(BaseModel):
    at: float  # unix seconds
    actor: str  # "api:<client address>" or "cli:<user>@<host>"
    action: str  # create_key, revoke_key, set_limits, block_user, ..., denied, locked_out
    target: str = ""  # the key id (and user) acted on
    detail: dict[str, Any] = {}  # the request's fields; never a secret

    def fields(self) -> dict[str, str]:
        return {"at": f"{self.at:.3f}", "actor": self.actor, "action": self.action,
                "target": self.target, "detail": json.dumps(self.detail, sort_keys=True)}

    @classmethod
    def of(cls, fields: dict[str, str]) -> AuditEntry:
        return cls(at=float(fields["at"]), actor=fields["actor"], action=fields["action"],
                   target=fields.get("target", ""),
                   detail=json.loads(fields.get("detail") or "{}"))


class AuditLog:
    def __init__(self, redis: Redis, keys: RedisKeys | None = None) -> None:
        self.redis = redis
        self.keys = keys or RedisKeys()

    async def record(self, actor: str, action: str, target: str = "",
                     detail: dict[str, Any] | None = None) -> None:
        entry = AuditEntry(at=time.time(), actor=actor, action=action, target=target,
                           detail=detail or {})
        await self.redis.xadd(self.keys.audit(), entry.fields(),  # type: ignore[arg-type]
                              maxlen=MAX_ENTRIES, approximate=True)

    async def recent(self, limit: int = 50, action: str | None = None) -> list[AuditEntry]:
        """The newest entries first (only ``action``'s, if given)."""
        raw = await self.redis.xrevrange(self.keys.audit(), count=limit if not action
                                         else MAX_ENTRIES) or []
        entries = [AuditEntry.of({_s(k): _s(v) for k, v in (fields or {}).items()})
                   for _, fields in raw]
        return [e for e in entries if action in (None, e.action)][:limit]


class AdminLockout:
    """At most ``max_failures`` refused admin requests per client per ``window_s``; past that
    the client is refused until the window ends (Redis, so every ingress replica agrees)."""

    def __init__(self, redis: Redis, keys: RedisKeys, max_failures: int, window_s: int) -> None:
        self.redis, self.keys = redis, keys
        self.max_failures, self.window_s = max_failures, window_s

    async def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None when it may now."""
        name = self.keys.admin_failures(client)
        count, ttl = await self.redis.get(name), await self.redis.ttl(name)
        if count is None or int(count) < self.max_failures:
            return None
        return max(1, int(ttl))

    async def failed(self, client: str) -> bool:
        """Count a refusal; True when it is the one that locks the client out."""
        name = self.keys.admin_failures(client)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(name)
            pipe.expire(name, self.window_s, nx=True)
            count, _ = await pipe.execute()
        return int(count) == self.max_failures


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
