"""The local Redis server helper: a real binary, our PID, nothing on disk, clean stop."""

from __future__ import annotations

import os

import pytest
import redis

from cluster.tools.redis_server import (
    RedisServer,
    RedisServerError,
    ensure_redis_url,
    find_server_binary,
    local_redis,
)


def test_binary_comes_from_the_installed_package_or_path() -> None:
    binary = find_server_binary()
    assert binary.is_file() and os.access(binary, os.X_OK)


def test_start_ping_config_and_stop() -> None:
    with local_redis() as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert int(client.info("server")["process_id"]) == server.pid
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert server.url.startswith("redis://127.0.0.1:")
        pid = server.pid
        server.restart()  # same port, new process
        assert server.pid != pid and redis.Redis.from_url(server.url).ping()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()


def test_a_port_served_by_someone_else_is_refused(redis_server: RedisServer) -> None:
    intruder = RedisServer(port=redis_server.port)
    with pytest.raises(RedisServerError):
        intruder.start(timeout=3)  # the port is taken: our process exits, theirs stays
    assert redis.Redis.from_url(redis_server.url).ping()
    intruder.close()


def test_ensure_redis_url_keeps_a_given_url() -> None:
    assert ensure_redis_url("redis://example:1234/0") == "redis://example:1234/0"
