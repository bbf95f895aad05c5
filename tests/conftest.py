"""Fixtures shared by every test module: a real Redis server (no fake Redis anywhere)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster.gate.redis_keys import RedisKeys
from cluster.tools.redis_server import RedisServer, local_redis
from tests.limits_support import fresh_names


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real server for the session, on a free loopback port, nothing on disk."""
    with local_redis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A server of the test's own, which it may stop (its data goes with it)."""
    with RedisServer() as s:
        yield s


@pytest.fixture
def names() -> RedisKeys:
    """A key prefix of this test's own on the shared server."""
    return fresh_names()
