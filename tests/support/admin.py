"""The /admin router in a bare FastAPI app on the test Redis, for TestClient tests."""

from __future__ import annotations

from fastapi import FastAPI
from redis.asyncio import Redis

from cluster.api.admin import make_admin_router
from cluster.api.errors import install_error_handlers
from cluster.config.settings import Settings
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.store import make_client

ADMIN = {"Authorization": "Bearer admin"}  # tests.limits_support.settings()'s admin key


def admin_app(redis_url: str, names: RedisKeys, conf: Settings) -> FastAPI:
    clients: list[Redis] = []

    def redis() -> Redis:  # created lazily, in the TestClient's event loop
        if not clients:
            clients.append(make_client(redis_url))
        return clients[0]

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(make_admin_router(redis, settings=conf, keys=names))
    return app
