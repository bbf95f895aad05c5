"""The gate's Lua scripts and their codec: each call's argument and reply are JSON objects
with named fields, built and read only here.

``admit.lua`` decides and reserves (:class:`AdmitCall` -> :class:`Decision`), ``settle.lua``
moves a reservation to the real usage (:class:`SettleCall`), ``reject.lua`` counts a request
refused before admission (:class:`RejectCall`). The in-memory fallback limiter answers with
the same :class:`Decision`, so the two can be compared on the same inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis

from cluster.errors import RateLimitState
from cluster.gate.redis_keys import RedisKeys, scope_name

WINDOW_MS = 60_000  # RPM and TPM are per minute
SCOPE_BITS = {"key": 1, "user": 2, "model": 4}  # which scopes hold a reservation
COMPACT = (",", ":")
# How long a user's spend per day and per month is kept (budget bits 4 and 8): as long as
# its budget can need it. A key's spend is kept ``spend_retention_days`` (reports).
USER_SPEND_TTL_S = {"4": 2 * 86400, "8": 62 * 86400}


def lua(name: str) -> str:
    return (files("cluster.gate") / "lua" / name).read_text()


@dataclass(frozen=True)
class BudgetHold:
    """Which budgets hold an admission's worst-case cost (bits: 1 key/day, 2 key/month,
    4 user/day, 8 user/month), the periods it is charged to (UTC day number, month
    number year*12 + month - 1; -1: settlement's own), and what is left."""

    bits: int = 0
    day: int = -1
    month: int = -1
    # the least budget left after this admission, of the key and of the user (nano-dollars;
    # -1: no budget), and in how long that budget resets: for fail-open mode
    key_left: int = -1
    key_reset_ms: int = 0
    user_left: int = -1
    user_reset_ms: int = 0


@dataclass(frozen=True)
class LiveAction:
    """The user's live abuse action as admission read it (``action`` ``""``: none), so
    that the in-memory limiter enforces it while Redis is down."""

    action: str = ""  # "" / "block" / "throttle"
    rpm: int = 0  # a throttle's requests per minute
    left_ms: int = 0  # until it ends


@dataclass(frozen=True)
class Decision:
    """One admission verdict. ``code`` is ``ok`` or why it was refused (``invalid_api_key``,
    ``revoked``, ``key_blocked``, ``user_blocked``, ``model_not_allowed``, ``requests``,
    ``tokens``, ``too_large``, ``concurrency``, ``budget``); ``scope`` the scope that
    refused (``throttled``: the user's rpm set by the abuse monitor); ``period`` the
    budget's (``day``/``month``), whose ``limit`` and ``used`` are nano-dollars."""

    code: str
    scope: str = ""
    limit: int = -1
    used: int = 0
    retry_ms: int = 0
    rate: RateLimitState = field(default_factory=RateLimitState)
    scope_bits: int = 0  # of the scopes holding the reservation, see SCOPE_BITS
    period: str = ""
    budget: BudgetHold = field(default_factory=BudgetHold, compare=False)  # not a verdict
    # None: admission did not get as far as the user's abuse action
    user_action: LiveAction | None = field(default=None, compare=False)

    @property
    def admitted(self) -> bool:
        return self.code == "ok"

    def scopes(self, key_id: str, user: str, model: str) -> tuple[str, ...]:
        """The names of the scopes holding this admission's reservation."""
        return tuple(scope_name(kind, key_id, user, model)
                     for kind, bit in SCOPE_BITS.items() if self.scope_bits & bit)


@dataclass(frozen=True)
class KnownKey:
    """What the admission script said about a key, kept for the fallback limiter."""

    key_id: str
    refusal: str = ""  # "revoked" / "key_blocked", or "" when usable
    rpm: int = 0
    tpm: int = 0
    max_concurrent: int = 0
    user_rpm: int = 0
    user_tpm: int = 0
    models: str = ""  # ",a,b," or "" for all


@dataclass(frozen=True)
class AdmitCall:
    keys: RedisKeys
    key_id: str
    digest: str  # "" for the anonymous key
    user: str
    model: str
    reserve: int
    reserve_nano: int  # the worst-case cost, held against the key's and user's budgets
    slot_id: str
    default_rpm: int
    default_tpm: int
    default_max_concurrent: int
    model_tpm: int
    lease_ms: int
    abuse_ttl_s: int
    spend_ttl_s: int
    max_length: bool
    now_ms: int | None = None  # tests only: otherwise Redis's clock

    def key_names(self) -> dict[str, str]:
        """Every Redis key the script touches, by its role in the script (the per-minute,
        per-day and per-month buckets are named inside it from their prefixes)."""
        k = self.keys
        names = {"record": k.record(self.key_id), "blocked_users": k.blocked_users(self.key_id),
                 "user_actions": k.user_actions(self.key_id),
                 "user_budgets": k.user_budgets(self.key_id), "slots": k.slots(self.key_id)}
        for kind in SCOPE_BITS:
            log, tokens = k.window(scope_name(kind, self.key_id, self.user, self.model))
            names |= {f"{kind}_log": log, f"{kind}_tokens": tokens}
        return names

    def argument(self, key_names: dict[str, str]) -> str:
        fields = dict(vars(self))  # the fields, as named (cheaper than dataclasses.asdict)
        del fields["keys"], fields["key_id"], fields["now_ms"]
        fields |= {"keys": key_names, "window_ms": WINDOW_MS,
                   "anonymous": not self.digest,
                   "abuse_prefix": self.keys.abuse_prefix(self.key_id),
                   "auth_failures_prefix": self.keys.auth_failures(),
                   "spend_prefix": self.keys.spend_prefix(self.key_id),
                   "user_spend_prefix": self.keys.user_spend_prefix(self.key_id),
                   "ttl_by_bit": USER_SPEND_TTL_S}
        if self.now_ms is not None:
            fields["now_ms"] = self.now_ms
        return json.dumps(fields, separators=COMPACT)


def decode_admit(reply: str, key_id: str) -> tuple[Decision, KnownKey | None]:
    """admit.lua's reply: the decision, and what it says of the key (None: unknown key)."""
    r = json.loads(reply)  # cjson writes whole numbers as JSON integers
    decision = Decision(r["code"], r["scope"], r["limit"], r["used"], r["retry_ms"],
                        RateLimitState(**r["rate"]), r["scope_bits"], r["period"],
                        BudgetHold(**r["budget"]),
                        LiveAction(**r["user_action"]) if r.get("user_action") else None)
    if decision.code == "invalid_api_key":
        return decision, None
    if decision.code in ("revoked", "key_blocked"):
        return decision, KnownKey(key_id, decision.code)
    return decision, KnownKey(key_id, **r["key"])


@dataclass(frozen=True)
class SettleCall:
    """One settlement; built by the gate, kept and resent as is while Redis is down (the
    script is idempotent by ``slot_id``, the request id)."""

    slots: str
    windows: list[tuple[str, str]]  # (log, tokens) of each scope holding the reservation
    slot_id: str
    settled: str  # the request's settled marker
    dedupe_s: int
    used: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost: float
    cost_nano: int
    reserved_nano: int
    budget_bits: int
    day: int
    month: int
    outcome: str
    user: str
    key_id: str
    model: str
    endpoint: str
    status: int
    latency_ms: int
    at_ms: int
    abuse_prefix: str
    abuse_ttl_s: int
    spend_prefix: str
    user_spend_prefix: str
    spend_ttl_s: int
    ledger: str
    ledger_retention_ms: int

    def script_keys(self) -> list[str]:
        return [self.slots, *(name for pair in self.windows for name in pair), self.settled,
                self.ledger]

    def argument(self) -> str:
        fields: dict[str, Any] = dict(vars(self))
        fields["cost"] = f"{float(self.cost):.10f}"  # HINCRBYFLOAT takes the exact decimal
        fields["ttl_by_bit"] = USER_SPEND_TTL_S
        return json.dumps(fields, separators=COMPACT)


@dataclass(frozen=True)
class RejectCall:
    record: str
    digest: str
    user: str
    reason: str
    abuse_prefix: str
    abuse_ttl_s: int
    auth_failures_prefix: str

    def argument(self) -> str:
        return json.dumps(vars(self), separators=COMPACT)


@dataclass
class Scripts:
    """The three scripts registered on a client (EVALSHA; redis-py reloads on NOSCRIPT)."""

    redis: Redis
    _scripts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("admit", "settle", "reject"):
            self._scripts[name] = self.redis.register_script(lua(f"{name}.lua"))

    async def admit(self, call: AdmitCall) -> tuple[Decision, KnownKey | None]:
        names = call.key_names()
        reply = await self._scripts["admit"](keys=list(names.values()),
                                             args=[call.argument(names)])
        return decode_admit(reply, call.key_id)

    async def settle(self, call: SettleCall) -> bool:
        """Whether this call settled the request (False: it was settled before)."""
        reply = await self._scripts["settle"](keys=call.script_keys(), args=[call.argument()])
        return bool(json.loads(reply)["applied"])

    async def reject(self, call: RejectCall) -> int:
        return int(await self._scripts["reject"](keys=[call.record], args=[call.argument()]))
