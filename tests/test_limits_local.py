"""The in-memory limiter of fail-open mode, on a clock of its own (no Redis, no waiting)."""

from __future__ import annotations

from cluster.limits_local import WINDOW_MS, KnownKey, LocalLimiter, decision_from_reply

KEY = KnownKey("key_1", rpm=3, tpm=1000, user_rpm=2, models=",m,")


def admit(lim: LocalLimiter, slot: str, now: int, *, user: str = "", model: str = "m",
          reserve: int = 100, model_tpm: int = 0, key: KnownKey = KEY) -> tuple[int, str]:
    d = lim.admit(key, user=user, model=model, reserve=reserve, slot=slot,
                  model_tpm=model_tpm, now=now)
    return d.status, d.code


def test_sliding_window_is_exact_at_its_edge() -> None:
    lim = LocalLimiter()
    key = KnownKey("k", rpm=3)
    got = [admit(lim, f"s{i}", 1000 + i, key=key) for i in range(4)]
    assert got == [(200, "ok")] * 3 + [(429, "requests")]
    d = lim.admit(key, user="", model="m", reserve=1, slot="x", model_tpm=0, now=1003)
    assert d.retry_ms == WINDOW_MS - 3  # the first entry leaves 60 s after it came
    assert admit(lim, "late", 1000 + WINDOW_MS - 1, key=key)[0] == 429
    assert admit(lim, "later", 1000 + WINDOW_MS, key=key) == (200, "ok")


def test_tokens_settle_and_concurrency() -> None:
    lim = LocalLimiter()
    key = KnownKey("k", tpm=1000, max_concurrent=2)
    assert admit(lim, "a", 0, reserve=800, key=key)[0] == 200
    assert admit(lim, "b", 1, reserve=800, key=key) == (429, "tokens")
    assert admit(lim, "c", 2, reserve=1001, key=key) == (429, "too_large")
    lim.settle(key_id="k", slot="a", scopes=("k:k",), used=150)
    assert admit(lim, "d", 3, reserve=800, key=key) == (200, "ok")
    assert admit(lim, "e", 4, reserve=100, key=key) == (429, "tokens")  # 950 + 100 > 1000
    lim.settle(key_id="k", slot="d", scopes=("k:k",), used=0)
    assert admit(lim, "f", 5, reserve=10, key=key) == (200, "ok")
    assert admit(lim, "g", 6, reserve=10, key=key) == (200, "ok")
    assert admit(lim, "h", 7, reserve=10, key=key) == (429, "concurrency")


def test_user_limits_blocks_and_models() -> None:
    lim = LocalLimiter()
    assert [admit(lim, f"u{i}", i, user="u")[1] for i in range(3)] == ["ok", "ok", "requests"]
    assert admit(lim, "v", 10, user="v")[1] == "ok"
    lim.blocked_users.add(("key_1", "w"))
    assert admit(lim, "w", 11, user="w") == (403, "user_blocked")
    assert admit(lim, "x", 12, model="other") == (403, "model_not_allowed")
    revoked = KnownKey("key_2", refusal="revoked")
    assert admit(lim, "y", 13, key=revoked) == (401, "revoked")


def test_global_model_tpm_spans_keys() -> None:
    lim = LocalLimiter()
    one, two = KnownKey("k1"), KnownKey("k2")
    assert admit(lim, "a", 0, reserve=600, model_tpm=1000, key=one)[0] == 200
    assert admit(lim, "b", 1, reserve=600, model_tpm=1000, key=two) == (429, "tokens")


def test_reply_parsing() -> None:
    reply = [200, "ok", "", -1, 0, 0, 5, 4, 60000, 1000, 900, 60000, 5, 1000, 2, 0, 0, ",m,", 1]
    d, key = decision_from_reply(reply, "key_1")
    assert (d.status, d.rem_req, d.rem_tok, d.mask) == (200, 4, 900, 1)
    assert key == KnownKey("key_1", "", 5, 1000, 2, 0, 0, ",m,")
    unknown = [401, "invalid_api_key", "key", *[-1, 0, 0, -1, -1, 0, -1, -1, 0],
               -1, -1, -1, -1, -1, "", 0]
    assert decision_from_reply(unknown, "key_9")[1] is None
