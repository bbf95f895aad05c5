"""The Redis client of the gate and its stores, and what "the store is down" means."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cluster.errors import StoreUnavailable

UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def make_client(url: str, timeout: float = 1.0, max_connections: int = 64) -> Redis:
    """A client whose calls fail fast when Redis is down.

    A bounded pool (callers wait for a free connection, at most ``2 x timeout``): a burst of
    requests must not open hundreds of connections at once. One retry, on connection errors
    only: it replaces a pooled connection that died with a restarted server; a timeout is
    not retried, since the script may have run.
    """
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=2 * timeout, decode_responses=True,
        socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    return Redis.from_pool(pool)


@contextmanager
def store_errors() -> Iterator[None]:
    """Redis unreachable inside the block -> :class:`~cluster.errors.StoreUnavailable`
    (the admin API answers 503, the CLI says so)."""
    try:
        yield
    except UNAVAILABLE as e:
        raise StoreUnavailable() from e
