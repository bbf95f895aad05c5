"""Redis stopped and restarted mid-run: fail closed (503) or open (in-memory), then recover."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from cluster.api.errors import error_body, rate_headers, status_of
from cluster.config.settings import RedisFailMode
from cluster.errors import ClusterError
from cluster.gate.contract import Outcome, Usage
from cluster.gate.keys import KeyLimits, KeyStore
from cluster.gate.redis_gate import RedisAdmission, RedisGate
from cluster.gate.redis_keys import RedisKeys
from cluster.tools.redis_server import RedisServer
from tests.limits_support import fresh_names, open_gate, settings, spec

pytestmark = pytest.mark.asyncio(loop_scope="session")

SECRET = "sk-outage-test-key-0123456789abcdefghijklmnop"
RETRY_S = 0.2


async def make_key(gate: RedisGate, names: RedisKeys, rpm: int) -> None:
    """The same key again after a restart (the test server keeps nothing on disk)."""
    await KeyStore(gate.redis, names).create("k", KeyLimits(rpm=rpm), secret=SECRET)


async def admit(gate: RedisGate, key: str = SECRET) -> RedisAdmission:
    granted = await gate.admit(api_key=key, user="u", model=spec(), reserve_tokens=10)
    assert isinstance(granted, RedisAdmission)
    return granted


async def status(gate: RedisGate, key: str = SECRET) -> int:
    try:
        await admit(gate, key)
    except ClusterError as e:
        return status_of(e)
    return 200


async def test_fail_closed_refuses_with_503_then_recovers(
        server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    names = fresh_names()
    conf = settings(fail_mode=RedisFailMode.closed, redis_retry_s=RETRY_S)
    async with open_gate(server.url, names, conf) as gate:
        await make_key(gate, names, rpm=100)
        in_flight = await admit(gate)
        server.stop()
        caplog.set_level(logging.WARNING, logger="cluster.gate.redis_gate")
        started = time.monotonic()
        with pytest.raises(ClusterError) as info:
            await admit(gate)
        assert status_of(info.value) == 503
        assert "Redis" in info.value.message and "unreachable" in info.value.message
        assert error_body(info.value)["error"]["code"] == "service_unavailable"
        assert [await status(gate) for _ in range(20)] == [503] * 20
        assert time.monotonic() - started < 1.0  # a dead Redis does not hang requests
        await gate.settle(in_flight, Usage(1, 1, 0.0), Outcome.ok)  # must not raise
        assert gate.stats.outages == 1 and gate.stats.unavailable == 21
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1  # once per outage, not per request

        server.start()
        await make_key(gate, names, rpm=100)
        await asyncio.sleep(RETRY_S)
        granted = await admit(gate)
        assert not granted.in_memory
        assert rate_headers(granted.rate)["x-ratelimit-remaining-requests"] == "99"
        assert not gate.redis_down


async def test_fail_open_keeps_in_memory_limits_then_returns_to_redis(
        server: RedisServer) -> None:
    names = fresh_names()
    conf = settings(fail_mode=RedisFailMode.open, redis_retry_s=RETRY_S)
    async with open_gate(server.url, names, conf) as gate:
        await make_key(gate, names, rpm=3)
        from_redis = await admit(gate)  # this replica now knows the key
        server.stop()
        local = [await admit(gate) for _ in range(3)]  # the per-replica window starts empty
        assert all(a.in_memory for a in local)
        remaining = [rate_headers(a.rate)["x-ratelimit-remaining-requests"] for a in local]
        assert remaining == ["2", "1", "0"]
        with pytest.raises(ClusterError) as info:
            await admit(gate)
        assert status_of(info.value) == 429  # the in-memory limit holds
        assert await status(gate, "sk-never-seen-by-this-replica-000000") == 503
        for a in (from_redis, *local):
            await gate.settle(a, Usage(1, 1, 0.0), Outcome.ok)  # nothing raises
        assert gate.stats.fallback_admissions == 3 and gate.stats.outages == 1

        server.start()
        await make_key(gate, names, rpm=3)
        await asyncio.sleep(RETRY_S)
        back = await admit(gate)
        assert not back.in_memory
        # Redis's count again:
        assert rate_headers(back.rate)["x-ratelimit-remaining-requests"] == "2"
        assert not gate.redis_down


async def test_a_restart_between_two_requests_is_invisible(server: RedisServer) -> None:
    """The pooled connection died with the server: one retry on a new one, and the script
    is loaded again (NOSCRIPT) — the request succeeds."""
    names = fresh_names()
    async with open_gate(server.url, names, settings()) as gate:
        await make_key(gate, names, rpm=100)
        await admit(gate)
        server.restart()
        await make_key(gate, names, rpm=100)
        granted = await admit(gate)
        assert rate_headers(granted.rate)["x-ratelimit-remaining-requests"] == "99"
        assert gate.stats.redis_errors == 0
