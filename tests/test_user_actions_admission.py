"""What admission does with the abuse monitor's live actions on a user (``admit.lua``
reading ``RedisKeys.user_actions``): a block is a 403 until it ends, a throttle lowers the
user's requests/min, expired and lifted entries change nothing; other users are untouched."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.api.errors import error_body, status_of
from cluster.config.settings import RedisFailMode
from cluster.errors import ClusterError
from cluster.gate.actions import UserAction
from cluster.gate.keys import KeyLimits, KeyStore
from cluster.gate.redis_gate import RedisGate
from cluster.gate.redis_keys import RedisKeys
from cluster.tools.redis_server import RedisServer
from tests.limits_support import open_gate, settings, spec

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def act(gate: RedisGate, names: RedisKeys, key_id: str, user: str, action: str,
              minutes: float, rpm: int = 0) -> None:
    now = int(time.time() * 1000)
    entry = UserAction(action=action, rpm=rpm, until_ms=now + int(minutes * 60_000),
                       rule="burst", at_ms=now)
    await gate.redis.hset(names.user_actions(key_id), user, entry.encoded())


async def status(gate: RedisGate, key: str, user: str) -> tuple[int, str]:
    try:
        await gate.admit(api_key=key, user=user, model=spec(), reserve_tokens=1)
    except ClusterError as e:
        return status_of(e), str(error_body(e)["error"]["message"])
    return 200, ""


async def test_live_actions_refuse_or_throttle_only_their_user(redis_url: str,
                                                               names: RedisKeys) -> None:
    async with open_gate(redis_url, names) as gate:
        created = await KeyStore(gate.redis, names).create("k", KeyLimits(rpm=0, tpm=0))
        key, key_id = created.secret, created.record.key_id
        await act(gate, names, key_id, "mallory", "block", minutes=5)
        await act(gate, names, key_id, "eve", "throttle", minutes=5, rpm=2)
        await act(gate, names, key_id, "old", "block", minutes=-1)  # ended
        await act(gate, names, key_id, "freed", "lifted", minutes=5)
        await act(gate, names, key_id, "watched", "flag", minutes=5)

        code, message = await status(gate, key, "mallory")
        assert code == 403 and "blocked for this API key for 4m" in message
        assert [(await status(gate, key, "eve"))[0] for _ in range(3)] == [200, 200, 429]
        code, message = await status(gate, key, "eve")
        assert code == 429 and "throttled by abuse monitoring" in message
        for user in ("old", "freed", "watched", "calm"):
            assert [(await status(gate, key, user))[0] for _ in range(3)] == [200] * 3


async def test_fail_open_keeps_the_actions_admission_last_read_until_they_end(
        server: RedisServer, names: RedisKeys) -> None:
    conf = settings(fail_mode=RedisFailMode.open, redis_retry_s=60)
    async with open_gate(server.url, names, conf) as gate:
        created = await KeyStore(gate.redis, names).create("k", KeyLimits(rpm=0, tpm=0))
        key, key_id = created.secret, created.record.key_id
        await act(gate, names, key_id, "mallory", "block", minutes=5)
        await act(gate, names, key_id, "eve", "throttle", minutes=5, rpm=2)
        # longer than stop() may take (it kills after 5 s), so it is live when first checked
        brief_ends = time.monotonic() + 6
        await act(gate, names, key_id, "brief", "block", minutes=0.1)
        seen = [(await status(gate, key, user))[0] for user in ("mallory", "eve", "brief")]
        assert seen == [403, 200, 403]  # read from Redis, and remembered
        server.stop()
        assert (await status(gate, key, "brief"))[0] == 403

        code, message = await status(gate, key, "mallory")
        assert code == 403 and "blocked for this API key for 4m" in message
        # the in-memory window starts at the outage: two more for eve, then the throttle
        assert [(await status(gate, key, "eve"))[0] for _ in range(3)] == [200, 200, 429]
        assert "throttled by abuse monitoring" in (await status(gate, key, "eve"))[1]
        assert [(await status(gate, key, "calm"))[0] for _ in range(3)] == [200] * 3
        await asyncio.sleep(max(0.0, brief_ends - time.monotonic()) + 0.2)
        assert (await status(gate, key, "brief"))[0] == 200  # its block ended by itself
        assert gate.stats.fallback_admissions == 2 + 3 + 1
