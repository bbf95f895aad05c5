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
Rejected requests are not logged (a client retrying in a loop does not lock itself out).

Headers: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` of the scope with the
least remaining (key, user or model). ``reset`` is when the oldest counted request leaves
the window, i.e. when remaining next goes up: in a sliding window that is the figure a
client can wait for (OpenAI's limits refill continuously, where "until full" means the
same). ``Retry-After`` (429) is exact: when enough entries leave the window for this
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
:class:`cluster.limits_local.LocalLimiter`, the same limits per replica (not divided by the
number of replicas), for keys this replica has seen. One log line per outage and counters
in :attr:`RedisGate.stats`. Settlements that fail are dropped (the reservation stays
charged and the slot expires with its lease): conservative, never an overdraw.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cluster.admission import Admission, Outcome, Usage
from cluster.catalog import ModelSpec
from cluster.errors import (
    APIError,
    AuthenticationFailed,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
)
from cluster.keys import ANONYMOUS, Names, hash_key, key_id_of, mask
from cluster.limits_local import WINDOW_MS, Decision, KnownKey, LocalLimiter, decision_from_reply
from cluster.settings import RedisFailMode, Settings, get_settings

log = logging.getLogger(__name__)

UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
NO_KEY = ("You didn't provide an API key. You need to provide your API key in an "
          "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")


def lua(name: str) -> str:
    return (files("cluster") / name).read_text()


def make_client(url: str, timeout: float = 1.0, max_connections: int = 64) -> Redis:
    """A client whose calls fail fast when Redis is down.

    A bounded pool (callers wait for a free connection, at most ``2 x timeout``): a burst of
    requests must not open hundreds of connections at once. One retry, on connection errors
    only: it replaces a pooled connection that died with a restarted server; a timeout is
    not retried, since the script may have run.
    """
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=2 * timeout, decode_responses=True,
        socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    return Redis.from_pool(pool)


def fmt_duration(ms: int) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    minutes, ms_left = divmod(ms, 60_000)
    seconds = f"{ms_left / 1000:.3f}".rstrip("0").rstrip(".")
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def rate_headers(d: Decision) -> dict[str, str]:
    out: dict[str, str] = {}
    for kind, limit, remaining, reset in (("requests", d.lim_req, d.rem_req, d.reset_req_ms),
                                          ("tokens", d.lim_tok, d.rem_tok, d.reset_tok_ms)):
        if limit >= 0:
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            out[f"x-ratelimit-reset-{kind}"] = fmt_duration(reset)
    return out


@dataclass
class RedisAdmission(Admission):
    scopes: tuple[str, ...] = ()  # window scopes holding the reservation ("k:..", "u:..")
    local: bool = False  # admitted by the in-memory fallback (fail open)


@dataclass
class GateStats:
    """Counters for metrics: the ingress may export them."""

    redis_errors: int = 0
    outages: int = 0
    local_admissions: int = 0  # admitted in memory while Redis was down (fail open)
    unavailable: int = 0  # 503s while Redis was down (fail closed)
    settle_failures: int = 0


class RedisGate:
    """The :class:`cluster.admission.Gate` backed by Redis. Build with :meth:`from_url`."""

    def __init__(self, redis: Redis, settings: Settings | None = None,
                 names: Names | None = None) -> None:
        self.redis = redis
        self.settings = settings or get_settings()
        self.names = names or Names()
        self.limits = self.settings.limits
        self.stats = GateStats()
        self.local = LocalLimiter(lease_ms=int(self.limits.slot_lease_s * 1000))
        self._admit = redis.register_script(lua("admit.lua"))
        self._settle = redis.register_script(lua("settle.lua"))
        self._reject = redis.register_script(lua("reject.lua"))
        self._skip_until = 0.0  # monotonic; Redis is not tried before this
        self._down = False

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None,
                 names: Names | None = None) -> RedisGate:
        settings = settings or get_settings()
        client = make_client(url, settings.limits.redis_timeout_s,
                             settings.limits.redis_max_connections)
        return cls(client, settings, names)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> RedisGate:
        settings = settings or get_settings()
        if not settings.redis_url:
            raise ValueError("CLUSTER_REDIS_URL is not set (cluster.redis_server starts one)")
        return cls.from_url(settings.redis_url, settings)

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
                        type(exc).__name__, self.settings.redis_fail_mode.value)

    def _succeeded(self) -> None:
        if self._down:
            self._down = False
            log.warning("Redis (limits store) reachable again; limits are shared again")

    @property
    def redis_down(self) -> bool:
        return self._down

    # --- admission

    async def admit(self, *, api_key: str | None, user: str | None, model: ModelSpec,
                    reserve_tokens: int) -> Admission:
        user = user or ""
        if len(user) > self.limits.user_max_length:
            raise InvalidRequest(f"'user' is longer than {self.limits.user_max_length} "
                                 f"characters", param="user", code="invalid_value")
        if not api_key and not self.settings.allow_anonymous:
            raise AuthenticationFailed(NO_KEY, code="invalid_api_key",
                                       type="invalid_request_error")
        digest = hash_key(api_key) if api_key else ""
        key_id = key_id_of(digest) if api_key else ANONYMOUS
        slot = secrets.token_hex(8)
        reserve = max(0, int(reserve_tokens))
        decision, local = await self._decide(digest, key_id, user, model, reserve, slot)
        if decision.status != 200:
            raise self._refusal(decision, api_key or "", model.id, reserve)
        scopes = self._scope_names(key_id, user, model.id, decision.mask)
        return RedisAdmission(key_id=key_id, user=user or None, model=model.id,
                              reserved_tokens=reserve, headers=rate_headers(decision),
                              token=slot, scopes=scopes, local=local)

    async def _decide(self, digest: str, key_id: str, user: str, model: ModelSpec,
                      reserve: int, slot: str) -> tuple[Decision, bool]:
        """The verdict, and whether it was made in memory (Redis down, fail open)."""
        if self._redis_usable():
            try:
                reply = await self._admit(keys=self._admit_keys(key_id, user, model.id),
                                          args=self._admit_args(digest, key_id, user, model,
                                                                reserve, slot))
            except UNAVAILABLE as exc:
                self._failed(exc)
            else:
                self._succeeded()
                return self._remember(reply, digest, key_id, user), False
        return self._decide_locally(digest, key_id, user, model, reserve, slot), True

    def _model_tpm(self, model_id: str) -> int:
        return self.limits.model_tpm.get(model_id, self.limits.default_model_tpm)

    def _admit_keys(self, key_id: str, user: str, model_id: str) -> list[str]:
        n = self.names
        return [n.key(key_id), n.blocked_users(key_id), n.slots(key_id),
                *n.window(f"k:{key_id}"), *n.window(f"u:{key_id}:{user}"),
                *n.window(f"m:{model_id}")]

    def _admit_args(self, digest: str, key_id: str, user: str, model: ModelSpec,
                    reserve: int, slot: str) -> list[Any]:
        lim, rules = self.limits, self.settings.abuse
        maxlen = reserve >= rules.maxlen_fraction * model.engine.max_model_len
        return [digest, user, model.id, reserve, slot, lim.rpm, lim.tpm, lim.max_concurrent,
                self._model_tpm(model.id), WINDOW_MS, int(lim.slot_lease_s * 1000),
                self.names.abuse_prefix(key_id), rules.retention_minutes * 60,
                int(maxlen), int(not digest), self.names.auth_failures()]

    def _remember(self, reply: list[Any], digest: str, key_id: str, user: str) -> Decision:
        """Keep what Redis said about the key, for fail-open mode."""
        decision, known = decision_from_reply(reply, key_id)
        if known is None:
            self.local.forget(digest)
            return decision
        self.local.remember(digest, known)
        if decision.code == "user_blocked":
            self.local.blocked_users.add((key_id, user))
        elif decision.status == 200:
            self.local.blocked_users.discard((key_id, user))
        return decision

    def _decide_locally(self, digest: str, key_id: str, user: str, model: ModelSpec,
                        reserve: int, slot: str) -> Decision:
        if self.settings.redis_fail_mode == RedisFailMode.closed:
            self.stats.unavailable += 1
            raise ServiceUnavailable(
                "Rate limits cannot be checked: the limits store (Redis) is unreachable, and "
                "requests are refused until it returns (redis_fail_mode=closed).",
                headers={"Retry-After": "1"})
        known = self.local.known.get(digest) if digest else self._anonymous()
        if known is None:
            self.stats.unavailable += 1
            raise ServiceUnavailable(
                "This API key cannot be verified: the limits store (Redis) is unreachable.",
                headers={"Retry-After": "1"})
        d = self.local.admit(known, user=user, model=model.id, reserve=reserve, slot=slot,
                             model_tpm=self._model_tpm(model.id))
        self.stats.local_admissions += d.status == 200
        return d

    def _anonymous(self) -> KnownKey:
        lim = self.limits
        return KnownKey(ANONYMOUS, rpm=lim.rpm, tpm=lim.tpm, max_concurrent=lim.max_concurrent)

    @staticmethod
    def _scope_names(key_id: str, user: str, model_id: str, bits: int) -> tuple[str, ...]:
        named = ((1, f"k:{key_id}"), (2, f"u:{key_id}:{user}"), (4, f"m:{model_id}"))
        return tuple(name for bit, name in named if bits & bit)

    def _refusal(self, d: Decision, api_key: str, model_id: str, reserve: int) -> APIError:
        if d.code == "invalid_api_key":
            return AuthenticationFailed(
                f"Incorrect API key provided: {mask(api_key)}.", code="invalid_api_key",
                type="invalid_request_error")
        if d.code == "revoked":
            return AuthenticationFailed("This API key has been revoked.",
                                        code="invalid_api_key", type="invalid_request_error")
        if d.code == "key_blocked":
            return PermissionDenied("This API key is blocked.", code="key_blocked")
        if d.code == "user_blocked":
            return PermissionDenied("This user is blocked for this API key.",
                                    code="user_blocked", param="user")
        if d.code == "model_not_allowed":
            return PermissionDenied(f"This API key may not use the model '{model_id}'.",
                                    code="model_not_allowed", param="model")
        return self._rate_limited(d, reserve)

    @staticmethod
    def _rate_limited(d: Decision, reserve: int) -> RateLimited:
        wait = fmt_duration(d.retry_ms)
        on = {"key": "this API key", "user": "this user", "model": "this model (all keys)"}
        where = on.get(d.scope, d.scope)
        if d.code == "requests":
            msg = (f"Rate limit reached for requests per minute (RPM) on {where}: "
                   f"Limit {d.limit}, Used {d.used}, Requested 1. Please try again in {wait}.")
        elif d.code == "tokens":
            msg = (f"Rate limit reached for tokens per minute (TPM) on {where}: Limit "
                   f"{d.limit}, Used {d.used}, Requested {reserve}. Please try again in {wait}.")
        elif d.code == "too_large":
            msg = (f"Request too large for tokens per minute (TPM) on {where}: Limit "
                   f"{d.limit}, Requested {reserve} (prompt + max_tokens). Reduce the prompt "
                   f"or max_tokens.")
        else:
            msg = (f"Too many concurrent requests on {where}: Limit {d.limit}. "
                   f"Please try again when a request finishes.")
        headers = rate_headers(d) | {"Retry-After": str(max(1, -(-d.retry_ms // 1000)))}
        kind = "tokens" if d.code in ("tokens", "too_large") else "rate_limit_exceeded"
        return RateLimited(msg, type=kind, code="rate_limit_exceeded", headers=headers)

    # --- settlement

    async def settle(self, admission: Admission, usage: Usage, outcome: Outcome) -> None:
        """Never raises; shielded so that a cancelled caller still settles."""
        if not isinstance(admission, RedisAdmission):
            return
        used = max(0, usage.prompt_tokens) + max(0, usage.completion_tokens)
        if admission.local:
            self.local.settle(key_id=admission.key_id, slot=admission.token,
                              scopes=admission.scopes, used=used)
            return
        await asyncio.shield(self._settle_in_redis(admission, usage, used, outcome))

    async def _settle_in_redis(self, a: RedisAdmission, usage: Usage, used: int,
                               outcome: Outcome) -> None:
        if not self._redis_usable():
            self.stats.settle_failures += 1
            return
        keys = [self.names.slots(a.key_id)]
        for scope in a.scopes:
            keys.extend(self.names.window(scope))
        rules = self.settings.abuse
        args: list[Any] = [
            a.token, used, max(0, usage.prompt_tokens), max(0, usage.completion_tokens),
            f"{float(usage.estimated_cost):.10f}", outcome.value, a.user or "",
            self.names.abuse_prefix(a.key_id), rules.retention_minutes * 60,
            self.names.spend_prefix(a.key_id), rules.spend_retention_days * 86400]
        try:
            await self._settle(keys=keys, args=args)
        except UNAVAILABLE as exc:
            self._failed(exc)
            self.stats.settle_failures += 1
        except Exception:
            log.exception("settlement failed for %s", a.key_id)
            self.stats.settle_failures += 1
        else:
            self._succeeded()

    # --- rejections before admission

    async def record_rejection(self, *, api_key: str | None, user: str | None,
                               model: str, reason: str) -> None:
        """Count a refused request (e.g. reason "400") against its key and user. Never raises."""
        if (not api_key and not self.settings.allow_anonymous) or not self._redis_usable():
            return
        digest = hash_key(api_key) if api_key else ""
        key_id = key_id_of(digest) if api_key else ANONYMOUS
        user = (user or "")[: self.limits.user_max_length]
        try:
            await self._reject(keys=[self.names.key(key_id)],
                               args=[digest, user, reason, self.names.abuse_prefix(key_id),
                                     self.settings.abuse.retention_minutes * 60,
                                     self.names.auth_failures()])
        except UNAVAILABLE as exc:
            self._failed(exc)
        except Exception:
            log.exception("recording a rejection failed for %s", key_id)
        else:
            self._succeeded()

    async def close(self) -> None:
        await self.redis.aclose()
