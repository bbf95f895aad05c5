"""The in-memory limiter of fail-open mode, on a clock of its own (no Redis, no waiting)."""

from __future__ import annotations

import json

from cluster.gate.fallback import FallbackLimiter
from cluster.gate.scripts import WINDOW_MS, BudgetHold, KnownKey, decode_admit

KEY = KnownKey("key_1", rpm=3, tpm=1000, user_rpm=2, models=",m,")


def admit(lim: FallbackLimiter, slot: str, now: int, *, user: str = "", model: str = "m",
          reserve: int = 100, model_tpm: int = 0, key: KnownKey = KEY) -> str:
    d = lim.admit(key, user=user, model=model, reserve=reserve, slot_id=slot,
                  model_tpm=model_tpm, now=now)
    return d.code


def test_sliding_window_is_exact_at_its_edge() -> None:
    lim = FallbackLimiter()
    key = KnownKey("k", rpm=3)
    got = [admit(lim, f"s{i}", 1000 + i, key=key) for i in range(4)]
    assert got == ["ok"] * 3 + ["requests"]
    d = lim.admit(key, user="", model="m", reserve=1, slot_id="x", model_tpm=0, now=1003)
    assert d.retry_ms == WINDOW_MS - 3  # the first entry leaves 60 s after it came
    assert admit(lim, "late", 1000 + WINDOW_MS - 1, key=key) == "requests"
    assert admit(lim, "later", 1000 + WINDOW_MS, key=key) == "ok"


def test_tokens_settle_and_concurrency() -> None:
    lim = FallbackLimiter()
    key = KnownKey("k", tpm=1000, max_concurrent=2)
    assert admit(lim, "a", 0, reserve=800, key=key) == "ok"
    assert admit(lim, "b", 1, reserve=800, key=key) == "tokens"
    assert admit(lim, "c", 2, reserve=1001, key=key) == "too_large"
    lim.settle(key_id="k", slot_id="a", scopes=("k:k",), used=150)
    assert admit(lim, "d", 3, reserve=800, key=key) == "ok"
    assert admit(lim, "e", 4, reserve=100, key=key) == "tokens"  # 950 + 100 > 1000
    lim.settle(key_id="k", slot_id="d", scopes=("k:k",), used=0)
    assert admit(lim, "f", 5, reserve=10, key=key) == "ok"
    assert admit(lim, "g", 6, reserve=10, key=key) == "ok"
    assert admit(lim, "h", 7, reserve=10, key=key) == "concurrency"


def test_user_limits_blocks_and_models() -> None:
    lim = FallbackLimiter()
    assert [admit(lim, f"u{i}", i, user="u") for i in range(3)] == ["ok", "ok", "requests"]
    assert admit(lim, "v", 10, user="v") == "ok"
    lim.blocked_users.add(("key_1", "w"))
    assert admit(lim, "w", 11, user="w") == "user_blocked"
    assert admit(lim, "x", 12, model="other") == "model_not_allowed"
    revoked = KnownKey("key_2", refusal="revoked")
    assert admit(lim, "y", 13, key=revoked) == "revoked"


def test_global_model_tpm_spans_keys() -> None:
    lim = FallbackLimiter()
    one, two = KnownKey("k1"), KnownKey("k2")
    assert admit(lim, "a", 0, reserve=600, model_tpm=1000, key=one) == "ok"
    assert admit(lim, "b", 1, reserve=600, model_tpm=1000, key=two) == "tokens"


def test_reply_decoding() -> None:
    rate = {"limit_requests": 5, "remaining_requests": 4, "reset_requests_ms": 60000,
            "limit_tokens": 1000, "remaining_tokens": 900, "reset_tokens_ms": 60000}
    reply = {"code": "ok", "scope": "", "limit": -1, "used": 0, "retry_ms": 0, "scope_bits": 1,
             "period": "", "budget": {"bits": 0, "day": 20424, "month": 24312},
             "rate": rate, "key": {"rpm": 5, "tpm": 1000, "max_concurrent": 2, "user_rpm": 0,
                                   "user_tpm": 0, "models": ",m,"}}
    d, key = decode_admit(json.dumps(reply), "key_1")
    assert (d.admitted, d.rate.remaining_requests, d.rate.remaining_tokens, d.scope_bits) == \
        (True, 4, 900, 1)
    assert key == KnownKey("key_1", "", 5, 1000, 2, 0, 0, ",m,")
    unknown = reply | {"code": "invalid_api_key", "scope": "key", "scope_bits": 0, "key": None}
    assert decode_admit(json.dumps(unknown), "key_9")[1] is None
    revoked = unknown | {"code": "revoked"}
    assert decode_admit(json.dumps(revoked), "key_9")[1] == KnownKey("key_9", "revoked")


def test_remembered_budgets_are_bounded_and_spent_down() -> None:
    limiter = FallbackLimiter(max_budgets=3)
    for user in ("a", "b", "c"):
        limiter.remember_budgets("k", user, BudgetHold(key_left=100, key_reset_ms=60_000,
                                                       user_left=10, user_reset_ms=60_000),
                                 now=0)
    assert list(limiter.budget_left) == [("k", "b"), ("k", ""), ("k", "c")]  # "a" dropped
    key = KnownKey("k")
    ok = limiter.admit(key, user="c", model="m", reserve=1, slot_id="s1", model_tpm=0,
                       reserve_nano=10, now=1)
    assert ok.admitted and limiter.budget_left[("k", "c")][0] == 0
    over = limiter.admit(key, user="c", model="m", reserve=1, slot_id="s2", model_tpm=0,
                         reserve_nano=1, now=2)
    assert (over.code, over.scope, over.retry_ms) == ("budget", "user", 59_998)
    limiter.credit_budgets("k", "c", 4)  # settled at 6 of the 10 held
    assert limiter.admit(key, user="c", model="m", reserve=1, slot_id="s3", model_tpm=0,
                         reserve_nano=4, now=3).admitted
    assert limiter.admit(key, user="d", model="m", reserve=1, slot_id="s4", model_tpm=0,
                         reserve_nano=10**6, now=4).code == "budget"  # the key's own left
    later = limiter.admit(key, user="d", model="m", reserve=1, slot_id="s5", model_tpm=0,
                          reserve_nano=10**6, now=60_001)  # the period ended: Redis will say
    assert later.admitted
