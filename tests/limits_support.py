"""Helpers for the limiter tests: a model spec, settings, gates on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

from cluster.config.catalog import ModelSpec
from cluster.config.settings import AbuseRules, LimitDefaults, RedisFailMode, Settings
from cluster.gate.redis_gate import RedisGate
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.scripts import lua

MODEL_A = "acme/model-a"
MODEL_B = "acme/model-b"


def spec(model_id: str = MODEL_A, context: int = 1000) -> ModelSpec:
    return ModelSpec.model_validate({
        "id": model_id, "profile": "local", "source": {"path": "/nowhere"},
        "engine": {"max_model_len": context}, "default_max_tokens": 100,
        "pricing": {"input_per_million": 1.0, "output_per_million": 2.0}})


def settings(*, fail_mode: RedisFailMode = RedisFailMode.closed, anonymous: bool = False,
             abuse: dict[str, Any] | None = None, **limits: Any) -> Settings:
    """Settings with explicit limits (the environment must not change a test)."""
    base: dict[str, Any] = {"rpm": 1000, "tpm": 1_000_000, "max_concurrent": 100}
    return Settings(redis_fail_mode=fail_mode, allow_anonymous=anonymous, admin_key="admin",
                    limits=LimitDefaults(**(base | limits)),
                    abuse=AbuseRules(**(abuse or {})))


def fresh_names() -> RedisKeys:
    """A key prefix of its own: tests share one server without seeing each other's keys."""
    return RedisKeys(f"t{secrets.token_hex(4)}:")


@contextlib.asynccontextmanager
async def open_gate(url: str, names: RedisKeys, conf: Settings | None = None
                    ) -> AsyncIterator[RedisGate]:
    gate = RedisGate.from_url(url, conf or settings(), names)
    try:
        yield gate
    finally:
        await gate.close()


# The race tests assert exactness, not latency: a CI machine that stalls for a second must
# not turn the burst into socket timeouts (and fail-closed refusals).
RACE_TIMEOUT_S = 10.0


async def warm(gate: RedisGate, connections: int) -> None:
    """Open the pool's connections and load the script, so a race starts warm."""
    await asyncio.gather(*(gate.redis.ping() for _ in range(connections)))
    await gate.redis.script_load(lua("admit.lua"))
