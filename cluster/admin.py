"""The admin HTTP API (``/admin``): keys, limits, blocking, top and flagged users, spend.

Every route needs ``Authorization: Bearer <settings.admin_key>`` (401 otherwise; with no
admin key configured the API refuses everything). The Redis client comes from the caller,
so the ingress mounts it on its own client::

    app.include_router(make_admin_router(lambda: gate.redis))

Errors are :class:`cluster.errors.APIError` (the app's handlers render them): 404 unknown
key, 400 bad input, 503 when Redis is unreachable.
"""

# No `from __future__ import annotations`: FastAPI must see the router-local dependency
# aliases (Keys, Abuse) as objects, not as strings it would resolve in module globals.
import functools
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from fastapi import APIRouter, Depends, Header, Query
from pydantic import BaseModel, Field
from redis.asyncio import Redis

from cluster.abuse import AbuseStore, Flag, SpendDay, UserActivity
from cluster.errors import APIError, AuthenticationFailed, InvalidRequest, ServiceUnavailable
from cluster.keys import KeyLimits, KeyNotFound, KeyRecord, KeyStore, Names
from cluster.limits import UNAVAILABLE
from cluster.settings import Settings, get_settings

P = ParamSpec("P")
T = TypeVar("T")


class NewKey(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    limits: KeyLimits = KeyLimits()
    models: list[str] | None = None  # None: every model


class CreatedKeyOut(BaseModel):
    key: str = Field(description="the secret; shown only in this response")
    record: KeyRecord


class LimitsPatch(KeyLimits):
    clear: list[str] = []  # limits back to their default
    models: list[str] | None = None
    all_models: bool = False


class UserRef(BaseModel):
    user: str = Field(min_length=1, max_length=1000)


class Done(BaseModel):
    ok: bool = True


def _mapped(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Store errors as OpenAI-style API errors."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except KeyNotFound as e:
            raise APIError(f"No API key with id {e.args[0]!r}.", code="key_not_found",
                           status_code=404) from e
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        except UNAVAILABLE as e:
            raise ServiceUnavailable("The limits store (Redis) is unreachable.") from e

    return wrapper


def make_admin_router(redis: Callable[[], Redis], *, settings: Settings | None = None,
                      names: Names | None = None) -> APIRouter:
    """The ``/admin`` router; ``redis`` returns the client to use (called per request)."""
    conf = settings or get_settings()
    names = names or Names()

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        if (not conf.admin_key or scheme.lower() != "bearer"
                or not secrets.compare_digest(given.strip().encode(), conf.admin_key.encode())):
            raise AuthenticationFailed("A valid admin key is required (Authorization: Bearer "
                                       "<admin key>).", code="invalid_admin_key")

    def key_store() -> KeyStore:
        return KeyStore(redis(), names)

    def abuse_store() -> AbuseStore:
        return AbuseStore(redis(), conf.abuse, names)

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authorize)])
    Keys = Annotated[KeyStore, Depends(key_store)]
    Abuse = Annotated[AbuseStore, Depends(abuse_store)]

    @router.post("/keys", status_code=201)
    @_mapped
    async def create_key(body: NewKey, keys: Keys) -> CreatedKeyOut:
        created = await keys.create(body.name, body.limits, body.models)
        return CreatedKeyOut(key=created.secret, record=created.record)

    @router.get("/keys")
    @_mapped
    async def list_keys(keys: Keys, include_revoked: bool = True) -> list[KeyRecord]:
        return await keys.list_keys(include_revoked)

    @router.get("/keys/{key_id}")
    @_mapped
    async def get_key(key_id: str, keys: Keys) -> KeyRecord:
        return await keys.get(key_id)

    @router.post("/keys/{key_id}/revoke")
    @_mapped
    async def revoke_key(key_id: str, keys: Keys) -> KeyRecord:
        return await keys.revoke(key_id)

    @router.patch("/keys/{key_id}/limits")
    @_mapped
    async def set_limits(key_id: str, body: LimitsPatch, keys: Keys) -> KeyRecord:
        limits = KeyLimits(**body.model_dump(include=set(KeyLimits.model_fields)))
        return await keys.set_limits(key_id, limits, clear=body.clear, models=body.models,
                                     all_models=body.all_models)

    @router.post("/keys/{key_id}/block")
    @_mapped
    async def block_key(key_id: str, keys: Keys) -> KeyRecord:
        return await keys.set_blocked(key_id, True)

    @router.post("/keys/{key_id}/unblock")
    @_mapped
    async def unblock_key(key_id: str, keys: Keys) -> KeyRecord:
        return await keys.set_blocked(key_id, False)

    _user_routes(router, Keys, Abuse)
    return router


def _user_routes(router: APIRouter, Keys: Any, Abuse: Any) -> None:
    @router.post("/keys/{key_id}/users/block")
    @_mapped
    async def block_user(key_id: str, body: UserRef, keys: Keys, abuse: Abuse) -> Done:
        await keys.get(key_id)
        await abuse.block_user(key_id, body.user)
        return Done()

    @router.post("/keys/{key_id}/users/unblock")
    @_mapped
    async def unblock_user(key_id: str, body: UserRef, abuse: Abuse) -> Done:
        return Done(ok=await abuse.unblock_user(key_id, body.user))

    @router.get("/keys/{key_id}/users/blocked")
    @_mapped
    async def blocked_users(key_id: str, abuse: Abuse) -> list[str]:
        return await abuse.blocked_users(key_id)

    @router.get("/keys/{key_id}/users/top")
    @_mapped
    async def top_users(key_id: str, abuse: Abuse,
                        minutes: Annotated[int, Query(ge=1, le=7 * 24 * 60)] = 60,
                        by: Literal["tokens", "requests", "rejected", "errors"] = "tokens",
                        limit: Annotated[int, Query(ge=1, le=1000)] = 10
                        ) -> list[UserActivity]:
        return await abuse.top_users(key_id, minutes, by, limit)

    @router.get("/users/flagged")
    @_mapped
    async def flagged_users(abuse: Abuse, key_id: str | None = None) -> list[Flag]:
        return await abuse.flagged(key_id)

    @router.get("/spend")
    @_mapped
    async def spend(abuse: Abuse, key_id: str | None = None,
                    days: Annotated[int, Query(ge=1, le=400)] = 7) -> list[SpendDay]:
        return await abuse.spend(key_id, days)
