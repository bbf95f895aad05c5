"""The key `cluster up` prints: limits a local benchmark fits under, printed next to it."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from cluster.gate.keys import KeyRecord, KeyStore
from cluster.tools.up import DEV_KEY_LIMITS, create_dev_key, snippet


def _stored(redis_url: str, key_id: str) -> KeyRecord:
    async def get() -> KeyRecord:
        client = Redis.from_url(redis_url, decode_responses=True)
        try:
            return await KeyStore(client).get(key_id)
        finally:
            await client.aclose()

    return asyncio.run(get())


def test_the_dev_key_is_stored_with_limits_for_a_local_benchmark(redis_url: str) -> None:
    created = create_dev_key(redis_url)
    limits = _stored(redis_url, created.record.key_id).limits
    assert limits == DEV_KEY_LIMITS
    # vllm bench serve at concurrency 32, a few hundred requests a minute, stays under them
    assert limits.max_concurrent is not None and limits.max_concurrent >= 32
    assert limits.rpm is not None and limits.rpm >= 600


def test_the_snippet_prints_the_key_its_id_and_its_limits(redis_url: str) -> None:
    created = create_dev_key(redis_url)
    text = snippet("http://127.0.0.1:8000", created, "m")
    assert f"Bearer {created.secret}" in text and created.record.key_id in text
    assert "1,000 requests/min, 2,000,000 tokens/min, 64 concurrent" in text


def test_up_host_reaches_the_stack_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cluster up --host` is the API's address (the stack passes settings.host to Serve)."""
    from typer.testing import CliRunner

    from cluster.config.settings import Settings
    from cluster.tools import up
    from cluster.tools.cli import app

    seen: list[Settings] = []
    monkeypatch.setattr(up, "run_up", seen.append)
    assert CliRunner().invoke(app, ["up", "--host", "0.0.0.0"]).exit_code == 0
    assert CliRunner().invoke(app, ["up"]).exit_code == 0
    assert [s.host for s in seen] == ["0.0.0.0", "127.0.0.1"]
