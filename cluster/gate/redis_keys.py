"""The layout of the gate's data in Redis: every key name, in one place."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

DEFAULT_PREFIX = "cluster:"


def periods_of(seconds: float) -> tuple[int, int]:
    """The UTC day number and month number (year * 12 + month - 1) the spend keys of a
    time use, as ``admit.lua`` computes them from Redis's clock."""
    date = dt.datetime.fromtimestamp(seconds, dt.UTC).date()
    return (date - dt.date(1970, 1, 1)).days, date.year * 12 + date.month - 1


def scope_name(kind: str, key_id: str, user: str = "", model: str = "") -> str:
    """A limit scope: a key, one ``user`` within a key, or a model (all keys)."""
    return {"key": f"k:{key_id}", "user": f"u:{key_id}:{user}", "model": f"m:{model}"}[kind]


@dataclass(frozen=True)
class RedisKeys:
    """Key names under one prefix (tests and benchmarks use their own)."""

    prefix: str = DEFAULT_PREFIX

    def record(self, key_id: str) -> str:
        """An API key's record (a hash; see :mod:`cluster.gate.keys`)."""
        return f"{self.prefix}key:{key_id}"

    def index(self) -> str:
        """The set of every key id."""
        return f"{self.prefix}keys"

    def blocked_users(self, key_id: str) -> str:
        return f"{self.prefix}ublock:{key_id}"

    def user_actions(self, key_id: str) -> str:
        """Live abuse actions on users of a key (a hash user -> JSON; see the monitor)."""
        return f"{self.prefix}uact:{key_id}"

    def user_budgets(self, key_id: str) -> str:
        """Budgets of named users of a key (a hash user -> JSON; see user_budgets)."""
        return f"{self.prefix}ubudget:{key_id}"

    def abuse_actions(self) -> str:
        """Every abuse action taken or lifted (a stream; see :mod:`cluster.gate.actions`)."""
        return f"{self.prefix}abuse:actions"

    def abuse_leader(self) -> str:
        """The lease of the one replica that evaluates the abuse rules (see the monitor)."""
        return f"{self.prefix}abuse:leader"

    def window(self, scope: str) -> tuple[str, str]:
        """The sliding-window log (zset) and its token amounts (hash) of one scope."""
        return f"{self.prefix}win:{scope}", f"{self.prefix}wtok:{scope}"

    def slots(self, key_id: str) -> str:
        """The concurrency slots of a key (zset scored by lease expiry)."""
        return f"{self.prefix}slots:{key_id}"

    def abuse_prefix(self, key_id: str) -> str:
        return f"{self.prefix}ab:{key_id}:"  # + minute number

    def spend_prefix(self, key_id: str) -> str:
        """A key's spend: + UTC day number (a hash), or + "m" + month number (year*12 +
        month - 1): requests, tokens, ``cost`` (USD), ``cost_nano`` and ``reserved_nano``."""
        return f"{self.prefix}spend:{key_id}:"

    def user_spend_prefix(self, key_id: str) -> str:
        """The same per ``user`` of a key: + user + ":" + day, or + user + ":m" + month."""
        return f"{self.prefix}uspend:{key_id}:"

    def ledger(self) -> str:
        """The usage ledger (a stream; see :mod:`cluster.gate.ledger`)."""
        return f"{self.prefix}ledger"

    def settled_prefix(self) -> str:
        """+ request id: present once a request is settled (settlement is idempotent)."""
        return f"{self.prefix}settled:"

    def auth_failures(self) -> str:
        return f"{self.prefix}authfail:"  # + minute number

    def audit(self) -> str:
        """The audit log of admin actions (a stream; see :mod:`cluster.gate.audit`)."""
        return f"{self.prefix}audit"

    def admin_failures(self, client: str) -> str:
        """Refused admin requests of one client in the current lockout window."""
        return f"{self.prefix}adminfail:{client}"
