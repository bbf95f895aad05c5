"""The limiter used while Redis is down and the gate fails open: the same limits, the same
sliding-window log and the same :class:`~cluster.gate.scripts.Decision` as ``admit.lua``,
held in this ingress replica's memory.

It is per replica: with N ingress replicas a key may get up to N times its limits during an
outage (the limits are not divided by N, since replicas do not know how traffic is spread).
Budgets: what Redis last said was left of the key's and the user's budgets (after that
admission), spent down by this replica's admissions and credited back by their
settlements; so a key may overspend by what the other replicas admit during the outage.
It knows only keys this replica admitted from Redis before the outage (their last limits,
blocked/revoked state, blocked users, and the live abuse actions, blocks and throttles, of
the users it admitted: until they end); other keys get a 503: failing open must not mean
letting unknown keys in. ``tests/test_gate_parity.py`` runs it and the Lua script on the
same sequences and asserts the same decisions.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from cluster.errors import RateLimitState
from cluster.gate.redis_keys import scope_name
from cluster.gate.scripts import (
    SCOPE_BITS,
    WINDOW_MS,
    BudgetHold,
    Decision,
    KnownKey,
    LiveAction,
)


class _Window:
    """A sliding-window log of (admitted ms, slot) with each slot's tokens."""

    def __init__(self) -> None:
        self.log: deque[tuple[int, str]] = deque()
        self.tokens: dict[str, int] = {}
        self.sum = 0

    def trim(self, cutoff: int) -> None:
        while self.log and self.log[0][0] <= cutoff:
            _, slot = self.log.popleft()
            self.sum -= self.tokens.pop(slot, 0)

    def add(self, now: int, slot: str, tokens: int) -> None:
        self.log.append((now, slot))
        self.tokens[slot] = tokens
        self.sum += tokens

    def settle(self, slot: str, used: int) -> None:
        if slot in self.tokens:
            self.sum += used - self.tokens[slot]
            self.tokens[slot] = used

    def expiry_of_rank(self, rank: int, now: int) -> int:
        if not 0 <= rank < len(self.log):
            return 0
        return max(0, self.log[rank][0] + WINDOW_MS - now)

    def token_retry(self, limit: int, need: int, now: int) -> int:
        excess, freed = self.sum + need - limit, 0
        for ts, slot in self.log:
            freed += self.tokens.get(slot, 0)
            if freed >= excess:
                return max(0, ts + WINDOW_MS - now)
        return WINDOW_MS


@dataclass
class _Scope:
    name: str
    window: _Window
    rpm: int
    tpm: int
    bit: int
    throttled: bool = False  # the user's rpm is an abuse throttle's


@dataclass
class FallbackLimiter:
    """Per-replica limits for fail-open mode. Not thread-safe: one event loop calls it."""

    lease_ms: int = 600_000
    max_keys: int = 10_000
    known: OrderedDict[str, KnownKey] = field(default_factory=OrderedDict)
    blocked_users: set[tuple[str, str]] = field(default_factory=set)
    _windows: dict[str, _Window] = field(default_factory=dict)
    _slots: dict[str, dict[str, int]] = field(default_factory=dict)
    max_budgets: int = 100_000  # budget and action scopes kept, least recent dropped first
    # (key_id, user or "") -> [nano-dollars left, epoch ms when that budget resets]
    budget_left: OrderedDict[tuple[str, str], list[int]] = field(default_factory=OrderedDict)
    # (key_id, user) -> (block or throttle, its rpm, epoch ms when it ends)
    user_actions: OrderedDict[tuple[str, str], tuple[str, int, int]] = field(
        default_factory=OrderedDict)

    def remember(self, digest: str, key: KnownKey) -> None:
        self.known[digest] = key
        self.known.move_to_end(digest)
        while len(self.known) > self.max_keys:
            self.known.popitem(last=False)

    def forget(self, digest: str) -> None:
        self.known.pop(digest, None)

    def remember_budgets(self, key_id: str, user: str, hold: BudgetHold, now: int) -> None:
        """What Redis said is left after an admission (-1: no budget, forgotten)."""
        self._set_budget((key_id, ""), hold.key_left, now + hold.key_reset_ms)
        if user:
            self._set_budget((key_id, user), hold.user_left, now + hold.user_reset_ms)

    def remember_action(self, key_id: str, user: str, act: LiveAction, now: int) -> None:
        """The user's live abuse action as admission last read it (none: forgotten)."""
        scope = (key_id, user)
        if not act.action:
            self.user_actions.pop(scope, None)
            return
        self.user_actions[scope] = (act.action, act.rpm, now + act.left_ms)
        self.user_actions.move_to_end(scope)
        while len(self.user_actions) > self.max_budgets:
            self.user_actions.popitem(last=False)

    def _live_action(self, key_id: str, user: str, now: int) -> tuple[str, int, int] | None:
        act = self.user_actions.get((key_id, user)) if user else None
        if act is not None and act[2] <= now:
            del self.user_actions[(key_id, user)]  # it ended by itself
            return None
        return act

    def _set_budget(self, scope: tuple[str, str], left: int, reset_at: int) -> None:
        if left < 0:
            self.budget_left.pop(scope, None)
            return
        self.budget_left[scope] = [left, reset_at]
        self.budget_left.move_to_end(scope)
        while len(self.budget_left) > self.max_budgets:
            self.budget_left.popitem(last=False)

    def _budget_scopes(self, key_id: str, user: str, now: int) -> list[tuple[str, str]]:
        scopes = [(key_id, "")] + ([(key_id, user)] if user else [])
        for s in scopes:
            if s in self.budget_left and self.budget_left[s][1] <= now:
                del self.budget_left[s]  # its period ended: Redis will tell the new figure
        return [s for s in scopes if s in self.budget_left]

    def _check_budgets(self, key_id: str, user: str, reserve_nano: int, now: int
                       ) -> Decision | None:
        for scope in self._budget_scopes(key_id, user, now):
            left, reset_at = self.budget_left[scope]
            if reserve_nano > left:
                return Decision("budget", "user" if scope[1] else "key", -1, -1,
                                max(0, reset_at - now))
        return None

    def credit_budgets(self, key_id: str, user: str, nano: int) -> None:
        """Give back ``nano`` (a settlement's reserve minus its real cost)."""
        for scope in [(key_id, "")] + ([(key_id, user)] if user else []):
            if scope in self.budget_left:
                self.budget_left[scope][0] += nano

    def _window(self, name: str) -> _Window:
        return self._windows.setdefault(name, _Window())

    def _scopes(self, key: KnownKey, user: str, model: str, model_tpm: int,
                throttle_rpm: int) -> list[_Scope]:
        urpm = key.user_rpm
        throttled = throttle_rpm > 0 and (urpm == 0 or throttle_rpm < urpm)
        limits = {"key": (key.rpm, key.tpm), "user": (
            throttle_rpm if throttled else urpm, key.user_tpm) if user else (0, 0),
            "model": (0, model_tpm)}
        return [_Scope(kind, self._window(scope_name(kind, key.key_id, user, model)), rpm, tpm,
                       SCOPE_BITS[kind], throttled and kind == "user")
                for kind, (rpm, tpm) in limits.items() if rpm > 0 or tpm > 0]

    def admit(self, key: KnownKey, *, user: str, model: str, reserve: int, slot_id: str,
              model_tpm: int, reserve_nano: int = 0, now: int | None = None) -> Decision:
        now = int(time.time() * 1000) if now is None else now
        if key.refusal:
            return Decision(key.refusal, "key")
        if user and (key.key_id, user) in self.blocked_users:
            return Decision("user_blocked", "user")
        act = self._live_action(key.key_id, user, now)
        if act is not None and act[0] == "block":
            return Decision("user_blocked", "user", -1, 0, act[2] - now)
        if key.models and f",{model}," not in key.models:
            return Decision("model_not_allowed", "key")
        throttle_rpm = act[1] if act is not None and act[0] == "throttle" else 0
        scopes = self._scopes(key, user, model, model_tpm, throttle_rpm)
        for s in scopes:
            s.window.trim(now - WINDOW_MS)
        refused = self._check(scopes, key, reserve, now)
        if refused:
            return refused
        over = self._check_budgets(key.key_id, user, reserve_nano, now)
        if over:
            return self._report(over, scopes, now)
        self.credit_budgets(key.key_id, user, -reserve_nano)
        for s in scopes:
            s.window.add(now, slot_id, reserve)
        if key.max_concurrent > 0:
            self._slots.setdefault(key.key_id, {})[slot_id] = now + self.lease_ms
        return self._report(Decision("ok", scope_bits=sum(s.bit for s in scopes)), scopes, now)

    def _check(self, scopes: list[_Scope], key: KnownKey, reserve: int, now: int
               ) -> Decision | None:
        for s in scopes:
            w, count = s.window, len(s.window.log)
            if s.rpm > 0 and count + 1 > s.rpm:
                return self._report(Decision("requests", "throttled" if s.throttled
                                             else s.name, s.rpm, count,
                                             w.expiry_of_rank(count - s.rpm, now)), scopes, now)
            if s.tpm > 0 and reserve > s.tpm:
                return self._report(Decision("too_large", s.name, s.tpm, w.sum, 1000),
                                    scopes, now)
            if s.tpm > 0 and w.sum + reserve > s.tpm:
                return self._report(Decision("tokens", s.name, s.tpm, w.sum,
                                             w.token_retry(s.tpm, reserve, now)), scopes, now)
        if key.max_concurrent > 0:
            slots = self._slots.setdefault(key.key_id, {})
            for slot in [k for k, exp in slots.items() if exp <= now]:
                del slots[slot]
            if len(slots) >= key.max_concurrent:
                return self._report(Decision("concurrency", "key", key.max_concurrent,
                                             len(slots), 1000), scopes, now)
        return None

    @staticmethod
    def _report(d: Decision, scopes: list[_Scope], now: int) -> Decision:
        lr, rr, tr, lt, rt, tt = -1, -1, 0, -1, -1, 0
        for s in scopes:
            reset = s.window.expiry_of_rank(0, now)
            count, total = len(s.window.log), s.window.sum
            if s.rpm > 0 and (rr < 0 or s.rpm - count < rr):
                lr, rr, tr = s.rpm, max(0, s.rpm - count), reset
            if s.tpm > 0 and (rt < 0 or s.tpm - total < rt):
                lt, rt, tt = s.tpm, max(0, s.tpm - total), reset
        return Decision(d.code, d.scope, d.limit, d.used, d.retry_ms,
                        RateLimitState(lr, rr, tr, lt, rt, tt), d.scope_bits)

    def settle(self, *, key_id: str, slot_id: str, scopes: tuple[str, ...], used: int) -> None:
        self._slots.get(key_id, {}).pop(slot_id, None)
        for name in scopes:
            window = self._windows.get(name)
            if window is not None:
                window.settle(slot_id, used)
