"""``RedisGate``: keys, rate limits, abuse counters and spend in Redis, one round trip each.

Admission (``admit.lua``, EVALSHA, reloaded on NOSCRIPT by redis-py) reads the key record,
refuses revoked/blocked keys, blocked users and models the key may not use, checks per-key
requests/min, tokens/min and concurrency, per-user limits within the key, and a global
tokens/min per model, then reserves and counts. Settlement (``settle.lua``) moves the
reservation to the real usage (refund or extra charge), frees the concurrency slot, and
records tokens, errors and spend. The time is Redis's (``TIME``), so replica clocks do
not matter.

Window algorithm: a sliding-window log per scope (key, user within key, model): a sorted
set of the requests admitted in the last 60 s (member: the request's slot id, score: its
admission time) and a hash of each request's tokens with a running sum. It is exact: at
most ``rpm`` requests and ``tpm`` tokens are admitted in ANY 60 s window, whatever the
number of replicas and however long a burst takes (GCRA would let a burst of rpm through
and then one more every 60/rpm s, so a burst slower than 60/rpm s overshoots; two fixed
buckets are an approximation). Its cost is one entry per admitted request per scope for a
minute, trimmed as it ages (amortised O(1) per request); scopes with no limit are not kept.
Settlement edits the request's own entry, so refunds are exact and cannot be double-counted.
Refused requests are not logged (a client retrying in a loop does not lock itself out).

Rate state (the API's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``): the
scope with the least remaining (key, user or model). ``reset`` is when the oldest counted
request leaves the window, i.e. when remaining next goes up: in a sliding window that is
the figure a client can wait for (OpenAI's limits refill continuously, where "until full" means the
same). A refusal's retry time is exact: when enough entries leave the window for this
request to fit.

Concurrency: a sorted set of slot ids scored by lease expiry (``slot_lease_s``): a replica
that dies mid-request leaks nothing, its slots expire. A request that outlives its lease
stops counting against concurrency.

Per-user limits apply only to requests that give ``user``. The global per-model TPM is
``settings.limits.model_tpm[model]`` or ``default_model_tpm`` (0: none), a settings
mapping rather than a catalog field.

Redis unreachable (connection refused, socket timeout ``redis_timeout_s``): after a failure
Redis is skipped for ``redis_retry_s`` and then tried again, so a dead Redis costs no
latency and the gate recovers by itself. ``redis_fail_mode=closed``: 503. ``open``:
:class:`cluster.gate.fallback.FallbackLimiter`, the same limits per replica (not divided by
the number of replicas), for keys this replica has seen. One log line per outage and
counters in :attr:`RedisGate.stats` (exported as metrics).

Budgets (USD per key and per user of a key, per UTC day and month): admission reserves the
request's worst-case cost (estimated prompt x input price + output limit x output price) in
the same script as the other limits, settlement replaces it with the real cost, both in
whole nano-dollars. Fail open: the in-memory limiter spends down what Redis last said was
left (per replica, as the other limits); the requests are charged in Redis when their
settlements get there.

Settlements that cannot reach Redis are kept in memory (``ledger.pending_max``, oldest
dropped first) and resent in order when Redis answers again: ``settle.lua`` is idempotent
by request id, so a settlement whose reply was lost is never counted twice. Until then the
reservations stay charged (conservative) and the slots expire with their lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field, fields

from redis.asyncio import Redis

from cluster.config.catalog import ModelSpec
from cluster.config.settings import RedisFailMode, Settings
from cluster.errors import StoreUnavailable, Unauthenticated
from cluster.gate.contract import Admission, Ending, Outcome, Usage, ending_of
from cluster.gate.fallback import FallbackLimiter
from cluster.gate.keys import ANONYMOUS, hash_key, key_id_of
from cluster.gate.redis_keys import RedisKeys, periods_of
from cluster.gate.refusals import NO_KEY, refusal
from cluster.gate.scripts import (
    AdmitCall,
    BudgetHold,
    Decision,
    KnownKey,
    RejectCall,
    Scripts,
    SettleCall,
)
from cluster.gate.store import UNAVAILABLE, make_client

log = logging.getLogger(__name__)


@dataclass
class RedisAdmission(Admission):
    scopes: tuple[str, ...] = ()  # window scopes holding the reservation ("k:..", "u:..")
    in_memory: bool = False  # admitted by the fallback limiter (Redis down, fail open)
    reserved_nano: int = 0  # held against the budgets in ``budget``
    budget: BudgetHold = field(default_factory=BudgetHold)


@dataclass
class GateStats:
    """Counters of this replica's gate, exported by the ingress metrics."""

    redis_errors: int = 0
    outages: int = 0
    fallback_admissions: int = 0  # admitted in memory while Redis was down (fail open)
    unavailable: int = 0  # refused with 503 while Redis was down
    settle_failures: int = 0  # settlements that did not reach Redis at first (kept, resent)
    settlements_resent: int = 0
    settlements_dropped: int = 0  # past ledger.pending_max: lost to the ledger

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class RedisGate:
    """The :class:`cluster.gate.contract.Gate` backed by Redis. Build with :meth:`from_url`."""

    def __init__(self, redis: Redis, conf: Settings,
                 keys: RedisKeys | None = None) -> None:
        self.redis = redis
        self.conf = conf
        self.keys = keys or RedisKeys()
        self.limits = conf.limits
        self.stats = GateStats()
        self.fallback = FallbackLimiter(lease_ms=self._lease_ms)
        self.scripts = Scripts(redis)
        self._skip_until = 0.0  # monotonic; Redis is not tried before this
        self._down = False
        self._pending: deque[SettleCall] = deque()
        self._flushing: asyncio.Task[int] | None = None

    @classmethod
    def from_url(cls, url: str, conf: Settings, keys: RedisKeys | None = None
                 ) -> RedisGate:
        client = make_client(url, conf.limits.redis_timeout_s, conf.limits.redis_max_connections)
        return cls(client, conf, keys)

    @property
    def _lease_ms(self) -> int:
        return int(self.limits.slot_lease_s * 1000)

    # --- Redis health: one log line per outage, then a retry every redis_retry_s

    def _redis_usable(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, exc: BaseException) -> None:
        self.stats.redis_errors += 1
        self._skip_until = time.monotonic() + self.limits.redis_retry_s
        if not self._down:
            self._down = True
            self.stats.outages += 1
            log.warning("Redis (limits store) unreachable (%s); failing %s until it returns",
                        type(exc).__name__, self.conf.redis_fail_mode.value)

    def _succeeded(self) -> None:
        if self._pending:
            self._resend_pending()
        if self._down:
            self._down = False
            log.warning("Redis (limits store) reachable again; limits are shared again")

    @property
    def redis_down(self) -> bool:
        return self._down

    @property
    def pending_settlements(self) -> int:
        """Settlements kept in memory, waiting for Redis."""
        return len(self._pending)

    # --- admission

    async def admit(self, *, api_key: str | None, user: str | None, model: ModelSpec,
                    reserve_tokens: int, reserve_cost: float = 0.0,
                    endpoint: str = "chat") -> Admission:
        user = user or ""
        if not api_key and not self.conf.allow_anonymous:
            raise Unauthenticated(NO_KEY)
        digest = hash_key(api_key) if api_key else ""
        key_id = key_id_of(digest) if api_key else ANONYMOUS
        call = self._admit_call(digest, key_id, user, model, max(0, int(reserve_tokens)),
                                max(0, round(reserve_cost * 1e9)))
        decision, in_memory = await self._decide(call)
        if not decision.admitted:
            raise refusal(decision, api_key or "", model.id, call.reserve,
                          call.reserve_nano / 1e9)
        return RedisAdmission(key_id=key_id, user=user or None, model=model.id,
                              reserved_tokens=call.reserve, rate=decision.rate,
                              slot_id=call.slot_id, reserved_cost=call.reserve_nano / 1e9,
                              endpoint=endpoint,
                              scopes=decision.scopes(key_id, user, model.id),
                              in_memory=in_memory, reserved_nano=call.reserve_nano,
                              budget=decision.budget)

    def _admit_call(self, digest: str, key_id: str, user: str, model: ModelSpec,
                    reserve: int, reserve_nano: int) -> AdmitCall:
        lim, rules = self.limits, self.conf.abuse
        return AdmitCall(
            keys=self.keys, key_id=key_id, digest=digest, user=user, model=model.id,
            reserve=reserve, reserve_nano=reserve_nano, slot_id=secrets.token_hex(8),
            default_rpm=lim.rpm, default_tpm=lim.tpm,
            default_max_concurrent=lim.max_concurrent,
            model_tpm=self._model_tpm(model.id), lease_ms=self._lease_ms,
            abuse_ttl_s=rules.retention_minutes * 60,
            spend_ttl_s=rules.spend_retention_days * 86400,
            max_length=reserve >= rules.maxlen_fraction * model.engine.max_model_len)

    async def _decide(self, call: AdmitCall) -> tuple[Decision, bool]:
        """The verdict, and whether it was made in memory (Redis down, fail open)."""
        if self._redis_usable():
            try:
                decision, known = await self.scripts.admit(call)
            except UNAVAILABLE as exc:
                self._failed(exc)
            else:
                self._succeeded()
                self._remember(decision, known, call)
                return decision, False
        return self._decide_in_memory(call), True

    def _model_tpm(self, model_id: str) -> int:
        return self.limits.model_tpm.get(model_id, self.limits.default_model_tpm)

    def _remember(self, decision: Decision, known: KnownKey | None, call: AdmitCall) -> None:
        """Keep what Redis said about the key, for fail-open mode."""
        if known is None:
            self.fallback.forget(call.digest)
            return
        self.fallback.remember(call.digest, known)
        now, act = int(time.time() * 1000), decision.user_action
        if act is not None:  # admission read the user's abuse action (after the block list)
            self.fallback.blocked_users.discard((call.key_id, call.user))
            self.fallback.remember_action(call.key_id, call.user, act, now)
        elif decision.code == "user_blocked":
            self.fallback.blocked_users.add((call.key_id, call.user))
        if decision.admitted:  # (with a user, its action was read: unblocked above)
            self.fallback.remember_budgets(call.key_id, call.user, decision.budget, now)

    def _decide_in_memory(self, call: AdmitCall) -> Decision:
        if self.conf.redis_fail_mode == RedisFailMode.closed:
            self.stats.unavailable += 1
            raise StoreUnavailable(
                "Rate limits cannot be checked: the limits store (Redis) is unreachable, and "
                "requests are refused until it returns (redis_fail_mode=closed).")
        known = self.fallback.known.get(call.digest) if call.digest else self._anonymous()
        if known is None:
            self.stats.unavailable += 1
            raise StoreUnavailable(
                "This API key cannot be verified: the limits store (Redis) is unreachable.")
        d = self.fallback.admit(known, user=call.user, model=call.model, reserve=call.reserve,
                                slot_id=call.slot_id, model_tpm=call.model_tpm,
                                reserve_nano=call.reserve_nano)
        self.stats.fallback_admissions += d.admitted
        return d

    def _anonymous(self) -> KnownKey:
        lim = self.limits
        return KnownKey(ANONYMOUS, rpm=lim.rpm, tpm=lim.tpm, max_concurrent=lim.max_concurrent)

    # --- settlement

    async def settle(self, admission: Admission, usage: Usage, ending: Ending | Outcome
                     ) -> None:
        """Never raises; shielded so that a cancelled caller still settles."""
        if not isinstance(admission, RedisAdmission):
            return
        used = max(0, usage.prompt_tokens) + max(0, usage.completion_tokens)
        call = self._settle_call(admission, usage, used, ending_of(ending))
        if admission.in_memory:
            self.fallback.settle(key_id=admission.key_id, slot_id=admission.slot_id,
                                 scopes=admission.scopes, used=used)
            self.fallback.credit_budgets(admission.key_id, admission.user or "",
                                         admission.reserved_nano - usage.cost_nano)
        await asyncio.shield(self._settle_in_redis(call))

    def _settle_call(self, a: RedisAdmission, usage: Usage, used: int,
                     ending: Ending) -> SettleCall:
        rules, now = self.conf.abuse, time.time()
        day, month = a.budget.day, a.budget.month
        if day < 0:  # admitted in memory: charged to the period it ended in
            day, month = periods_of(now)
        held = not a.in_memory  # an in-memory admission holds nothing in Redis
        return SettleCall(
            slots=self.keys.slots(a.key_id),
            windows=[self.keys.window(s) for s in a.scopes] if held else [],
            slot_id=a.slot_id, settled=self.keys.settled_prefix() + a.slot_id,
            dedupe_s=int(self.conf.ledger.dedupe_hours * 3600), used=used,
            prompt_tokens=max(0, usage.prompt_tokens),
            completion_tokens=max(0, usage.completion_tokens),
            cached_tokens=max(0, usage.cached_tokens), cost=usage.estimated_cost,
            cost_nano=usage.cost_nano, reserved_nano=a.reserved_nano if held else 0,
            budget_bits=a.budget.bits if held else 0, day=day, month=month,
            outcome=ending.outcome.value, user=a.user or "", key_id=a.key_id, model=a.model,
            endpoint=a.endpoint, status=ending.status, latency_ms=ending.latency_ms,
            at_ms=int(now * 1000), abuse_prefix=self.keys.abuse_prefix(a.key_id),
            abuse_ttl_s=rules.retention_minutes * 60,
            spend_prefix=self.keys.spend_prefix(a.key_id),
            user_spend_prefix=self.keys.user_spend_prefix(a.key_id),
            spend_ttl_s=rules.spend_retention_days * 86400, ledger=self.keys.ledger(),
            ledger_retention_ms=int(self.conf.ledger.retention_days * 86_400_000))

    async def _settle_in_redis(self, call: SettleCall) -> None:
        if self._redis_usable() and await self._send(call):
            return
        self.stats.settle_failures += 1
        self._keep(call)

    async def _send(self, call: SettleCall) -> bool:
        """One settlement to Redis; False when it did not get there (keep it)."""
        try:
            await self.scripts.settle(call)
        except UNAVAILABLE as exc:
            self._failed(exc)
            return False
        except Exception:  # a bug or a refused script: resending would fail the same way
            log.exception("settlement failed for %s; dropped", call.key_id)
            self.stats.settlements_dropped += 1
            return True
        self._succeeded()
        return True

    def _keep(self, call: SettleCall) -> None:
        limit = self.conf.ledger.pending_max
        if limit == 0:
            self.stats.settlements_dropped += 1
            return
        if len(self._pending) >= limit:
            self._pending.popleft()
            self.stats.settlements_dropped += 1
            if self.stats.settlements_dropped == 1:
                log.error("more than %d settlements wait for Redis: dropping the oldest "
                          "(lost to the ledger and the spend counters)", limit)
        self._pending.append(call)

    def _resend_pending(self) -> None:
        if self._pending and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.create_task(self.flush_pending())

    async def flush_pending(self) -> int:
        """Resend the kept settlements in order; stops at the first failure. Returns how
        many reached Redis."""
        sent = 0
        while self._pending and self._redis_usable():
            call = self._pending.popleft()  # taken first: two flushes never send one twice
            if not await self._send(call):
                self._pending.appendleft(call)
                break
            sent += 1
        self.stats.settlements_resent += sent
        return sent

    # --- refusals before admission

    async def record_rejection(self, *, api_key: str | None, user: str | None,
                               model: str, reason: str) -> None:
        """Count a refused request (e.g. reason "400") against its key and user. Never raises."""
        if (not api_key and not self.conf.allow_anonymous) or not self._redis_usable():
            return
        digest = hash_key(api_key) if api_key else ""
        key_id = key_id_of(digest) if api_key else ANONYMOUS
        call = RejectCall(record=self.keys.record(key_id), digest=digest, user=user or "",
                          reason=reason, abuse_prefix=self.keys.abuse_prefix(key_id),
                          abuse_ttl_s=self.conf.abuse.retention_minutes * 60,
                          auth_failures_prefix=self.keys.auth_failures())
        try:
            await self.scripts.reject(call)
        except UNAVAILABLE as exc:
            self._failed(exc)
        except Exception:
            log.exception("recording a rejection failed for %s", key_id)
        else:
            self._succeeded()

    async def close(self) -> None:
        """Resend what is kept (a replica going away loses only what Redis cannot take)."""
        if self._pending:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush_pending(), timeout=5)
        if self._pending:
            log.error("%d settlements never reached Redis: lost to the ledger", len(self._pending))
        await self.redis.aclose()
