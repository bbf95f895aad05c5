"""The usage ledger: one entry per settled request, what a bill is made from.

``settle.lua`` appends each request to the stream ``RedisKeys.ledger()`` in the same atomic
step that charges the spend counters and budgets, once per request id (a retried
settlement finds the request's ``settled:`` marker and changes nothing), and trims entries
older than ``ledger.retention_days`` (``XADD MINID ~``: whole stream nodes, so a few more
are kept). The stream's ids are the times Redis appended the entries (settlement order);
``ts`` is when the request ended at the ingress, which differs only for settlements resent
after a Redis outage. Export pages by stream id: ``cursor`` is the last id returned.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import cast

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from cluster.errors import InvalidRequest
from cluster.gate.redis_keys import RedisKeys

STREAM_ID = re.compile(r"\d{1,19}-\d{1,19}")
FIELDS = ("id", "ts", "request_id", "key_id", "user", "model", "endpoint", "prompt_tokens",
          "completion_tokens", "cached_tokens", "cost", "cost_nano", "status", "latency_ms",
          "outcome")


class LedgerEntry(BaseModel):
    id: str = Field(description="the stream id: when Redis recorded it (ms-seq)")
    ts: int = Field(description="when the request ended, epoch ms")
    request_id: str
    key_id: str
    user: str
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost: float = Field(description="USD")
    cost_nano: int = Field(description="the same cost in nano-dollars (exact)")
    status: int = Field(description="the HTTP status the client got")
    latency_ms: int
    outcome: str = Field(description="ok, error or disconnected")


class LedgerPage(BaseModel):
    entries: list[LedgerEntry]
    next_cursor: str | None = Field(description="pass as cursor for the next page; "
                                    "null: no more entries in the range")


def _entry(stream_id: str, raw: dict[str, str]) -> LedgerEntry:
    return LedgerEntry.model_validate({"id": stream_id, **raw})


class UsageLedger:
    def __init__(self, redis: Redis, keys: RedisKeys | None = None) -> None:
        self.redis = redis
        self.keys = keys or RedisKeys()

    async def page(self, since_ms: int, until_ms: int, *, cursor: str | None = None,
                   limit: int = 1000, key_id: str | None = None) -> LedgerPage:
        """Entries recorded in [since_ms, until_ms), oldest first, at most ``limit``
        (before the ``key_id`` filter) after ``cursor``."""
        since_ms = max(0, since_ms)  # stream ids start at the epoch
        if until_ms <= since_ms:
            raise InvalidRequest("until must be after since (and after 1970)", param="until")
        if cursor is not None and not STREAM_ID.fullmatch(cursor):
            raise InvalidRequest("cursor is a next_cursor this API returned (ms-seq)",
                                 param="cursor")
        start = f"({cursor}" if cursor else f"{since_ms}-0"
        raw = cast(list[tuple[str, dict[str, str]]], await self.redis.xrange(
            self.keys.ledger(), min=start, max=f"{until_ms - 1}-18446744073709551615",
            count=limit))
        entries = [_entry(i, f) for i, f in raw if key_id is None or f.get("key_id") == key_id]
        return LedgerPage(entries=entries,
                          next_cursor=raw[-1][0] if len(raw) == limit else None)

    async def entries(self, since_ms: int, until_ms: int, key_id: str | None = None,
                      page_size: int = 1000) -> AsyncIterator[LedgerEntry]:
        """Every entry of the range, page by page."""
        cursor: str | None = None
        while True:
            page = await self.page(since_ms, until_ms, cursor=cursor, limit=page_size,
                                   key_id=key_id)
            for entry in page.entries:
                yield entry
            if page.next_cursor is None:
                return
            cursor = page.next_cursor
