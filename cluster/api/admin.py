"""The admin HTTP API (``/admin``): keys, limits, budgets of keys and of named users,
blocking, top and flagged users, abuse policies and actions, spend, the usage ledger.

Every route needs ``Authorization: Bearer <settings.admin_key>`` (401 otherwise; with no
admin key configured the API refuses everything); :mod:`cluster.api.admin_guard` checks it,
locks out guessing clients and writes every change to the audit log. The Redis client comes
from the caller,
so the ingress mounts it on its own client::

    app.include_router(make_admin_router(lambda: gate.redis))

The stores raise :mod:`cluster.errors` exceptions (404 unknown key, 400 bad input) and
:func:`cluster.gate.store.store_errors` turns an unreachable Redis into a 503; the app's
one error table renders them all.
"""

# No `from __future__ import annotations`: FastAPI must see the router-local dependency
# aliases (Keys, Abuse, Spend) as objects, not as strings it would resolve in module globals.
import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from cluster.api.admin_guard import admin_route, client_of, known_query
from cluster.api.errors import documented
from cluster.config.settings import Settings
from cluster.gate.abuse import AbuseStore, Flag, UserActivity
from cluster.gate.actions import ActionEntry, ActionLog, UserActions, lift_hold_minutes
from cluster.gate.audit import AuditEntry, AuditLog
from cluster.gate.keys import (
    AbusePolicy,
    BudgetName,
    KeyBudgets,
    KeyLimits,
    KeyRecord,
    KeyStore,
)
from cluster.gate.ledger import LedgerPage, UsageLedger
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.spend import SpendDay, SpendStore
from cluster.gate.store import store_errors
from cluster.gate.user_budgets import UserBudget, UserBudgets, UserBudgetState

ADMIN_KEY = HTTPBearer(auto_error=False, scheme_name="adminKey",
                       description="The admin key: `Authorization: Bearer <admin key>`")


# A model id as keys store it: no commas (the separator), no surrounding blanks.
ModelId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^,\s](?:[^,]*[^,\s])?$")]
ModelIds = Annotated[list[ModelId], Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # a typo is a 400, not ignored


class NewKey(_Body):
    name: str = Field(min_length=1, max_length=200)
    limits: KeyLimits = KeyLimits()
    budgets: KeyBudgets = KeyBudgets()
    models: ModelIds | None = None  # None: every model


class CreatedKeyOut(BaseModel):
    key: str = Field(description="the secret; shown only in this response")
    record: KeyRecord


class LimitsPatch(KeyLimits, _Body):
    clear: list[Literal["rpm", "tpm", "max_concurrent", "user_rpm", "user_tpm"]] = []
    models: ModelIds | None = None  # None: unchanged
    all_models: bool = False


class BudgetsPatch(KeyBudgets, _Body):
    clear: list[BudgetName] = []


class BudgetState(BaseModel):
    budgets: KeyBudgets
    spent_today_usd: float
    spent_this_month_usd: float


class UserRef(_Body):
    user: str = Field(min_length=1, max_length=1000)


class UserBudgetBody(UserBudget, _Body):
    """A user's own budgets: a period left null keeps the key's per-user budget; with both
    null the user's own budgets are removed."""

    user: str = Field(min_length=1, max_length=1000)


class Done(BaseModel):
    ok: bool = True


class PolicyBody(AbusePolicy, _Body):
    """The whole policy: a field left out goes back to the settings' default."""


class Lifted(Done):
    lifted: ActionEntry | None = Field(None, description="the lift recorded; null when the "
                                       "user had no live throttle or block")


def epoch_ms(when: dt.datetime) -> int:
    """A time as the ledger's stream ids count it (naive: UTC)."""
    return int((when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp() * 1000)


def make_admin_router(redis: Callable[[], Redis], settings: Settings,
                      keys: RedisKeys | None = None) -> APIRouter:
    """The ``/admin`` router; ``redis`` returns the client to use (called per request)."""
    layout = keys or RedisKeys()

    AdminRoute = admin_route(redis, layout, settings)

    def authorize(_: Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_KEY)]
                  ) -> None:
        """Declares the scheme in the OpenAPI document; AdminRoute enforces it."""

    # Each store is yielded inside store_errors(): an unreachable Redis in a route is a 503.
    async def key_store() -> AsyncIterator[KeyStore]:
        with store_errors():
            yield KeyStore(redis(), layout)

    async def abuse_store() -> AsyncIterator[AbuseStore]:
        with store_errors():
            yield AbuseStore(redis(), settings.abuse, layout)

    async def spend_store() -> AsyncIterator[SpendStore]:
        with store_errors():
            yield SpendStore(redis(), layout)

    router = APIRouter(prefix="/admin", tags=["admin"], route_class=AdminRoute,
                       dependencies=[Depends(authorize), Depends(known_query)],
                       responses=documented(400, 401, 404, 503))
    Keys = Annotated[KeyStore, Depends(key_store)]
    Abuse = Annotated[AbuseStore, Depends(abuse_store)]
    Spend = Annotated[SpendStore, Depends(spend_store)]

    @router.post("/keys", status_code=201)
    async def create_key(body: NewKey, keys: Keys) -> CreatedKeyOut:
        created = await keys.create(body.name, body.limits, body.models, budgets=body.budgets)
        return CreatedKeyOut(key=created.secret, record=created.record)

    @router.get("/keys")
    async def list_keys(keys: Keys, include_revoked: bool = True) -> list[KeyRecord]:
        return await keys.list_keys(include_revoked)

    @router.get("/keys/{key_id}")
    async def get_key(key_id: str, keys: Keys) -> KeyRecord:
        return await keys.get(key_id)

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str, keys: Keys) -> KeyRecord:
        return await keys.revoke(key_id)

    @router.patch("/keys/{key_id}/limits")
    async def set_limits(key_id: str, body: LimitsPatch, keys: Keys) -> KeyRecord:
        limits = KeyLimits(**body.model_dump(include=set(KeyLimits.model_fields)))
        return await keys.set_limits(key_id, limits, clear=body.clear, models=body.models,
                                     all_models=body.all_models)

    @router.patch("/keys/{key_id}/budgets")
    async def set_budgets(key_id: str, body: BudgetsPatch, keys: Keys) -> KeyRecord:
        """USD budgets per UTC day and month, of the key and of each of its users."""
        budgets = KeyBudgets(**body.model_dump(include=set(KeyBudgets.model_fields)))
        return await keys.set_budgets(key_id, budgets, clear=body.clear)

    @router.get("/keys/{key_id}/budgets")
    async def budgets(key_id: str, keys: Keys, spend: Spend) -> BudgetState:
        """The key's budgets and what it spent today and this month (UTC), as admission
        counts them."""
        record = await keys.get(key_id)
        today, month = await spend.budget_spend(key_id)
        return BudgetState(budgets=record.budgets, spent_today_usd=today / 1e9,
                           spent_this_month_usd=month / 1e9)

    @router.get("/usage")
    async def usage(since: Annotated[dt.datetime, Query(description="ISO 8601; UTC if naive")],
                    until: Annotated[dt.datetime, Query(description="ISO 8601, excluded")],
                    key_id: str | None = None, cursor: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> LedgerPage:
        """The usage ledger: one entry per settled request, oldest first, a page at a time
        (pass ``next_cursor`` back as ``cursor``)."""
        with store_errors():
            return await UsageLedger(redis(), layout).page(
                epoch_ms(since), epoch_ms(until), cursor=cursor, limit=limit, key_id=key_id)

    @router.post("/keys/{key_id}/block")
    async def block_key(key_id: str, keys: Keys) -> KeyRecord:
        return await keys.set_blocked(key_id, True)

    @router.post("/keys/{key_id}/unblock")
    async def unblock_key(key_id: str, keys: Keys) -> KeyRecord:
        return await keys.set_blocked(key_id, False)

    @router.get("/audit")
    async def audit(limit: Annotated[int, Query(ge=1, le=10_000)] = 50,
                    action: str | None = None) -> list[AuditEntry]:
        with store_errors():
            return await AuditLog(redis(), layout).recent(limit, action)

    _user_routes(router, Keys, Abuse, Spend)
    _user_budget_routes(router, Keys, redis, layout)
    _abuse_routes(router, Keys, redis, layout, settings)
    return router


def _user_routes(router: APIRouter, Keys: Any, Abuse: Any, Spend: Any) -> None:
    @router.post("/keys/{key_id}/users/block")
    async def block_user(key_id: str, body: UserRef, keys: Keys, abuse: Abuse) -> Done:
        await keys.get(key_id)
        await abuse.block_user(key_id, body.user)
        return Done()

    @router.post("/keys/{key_id}/users/unblock")
    async def unblock_user(key_id: str, body: UserRef, abuse: Abuse) -> Done:
        return Done(ok=await abuse.unblock_user(key_id, body.user))

    @router.get("/keys/{key_id}/users/blocked")
    async def blocked_users(key_id: str, abuse: Abuse) -> list[str]:
        return await abuse.blocked_users(key_id)

    @router.get("/keys/{key_id}/users/top")
    async def top_users(key_id: str, abuse: Abuse,
                        minutes: Annotated[int, Query(ge=1, le=7 * 24 * 60)] = 60,
                        by: Literal["tokens", "requests", "rejected", "errors"] = "tokens",
                        limit: Annotated[int, Query(ge=1, le=1000)] = 10
                        ) -> list[UserActivity]:
        return await abuse.top_users(key_id, minutes, by, limit)

    @router.get("/users/flagged")
    async def flagged_users(abuse: Abuse, key_id: str | None = None) -> list[Flag]:
        return await abuse.flagged(key_id)

    @router.get("/spend")
    async def spend(spend: Spend, key_id: str | None = None,
                    days: Annotated[int, Query(ge=1, le=400)] = 7) -> list[SpendDay]:
        return await spend.spend(key_id, days)


def _user_budget_routes(router: APIRouter, Keys: Any, redis: Callable[[], Redis],
                        layout: RedisKeys) -> None:
    """Budgets of named users (:mod:`cluster.gate.user_budgets`)."""
    async def user_budgets() -> AsyncIterator[UserBudgets]:
        with store_errors():
            yield UserBudgets(redis(), layout)

    Budgets = Annotated[UserBudgets, Depends(user_budgets)]
    UserQuery = Annotated[str, Query(min_length=1, max_length=1000)]

    @router.put("/keys/{key_id}/users/budget")
    async def set_user_budget(key_id: str, body: UserBudgetBody, keys: Keys,
                              budgets: Budgets) -> UserBudgetState:
        """Give one user of the key budgets of their own per UTC day and month, in place of
        the key's per-user budgets."""
        record = await keys.get(key_id)
        await budgets.set(key_id, body.user, UserBudget(day_usd=body.day_usd,
                                                        month_usd=body.month_usd))
        return await budgets.state(record, body.user)

    @router.get("/keys/{key_id}/users/budget")
    async def user_budget(key_id: str, user: UserQuery, keys: Keys,
                          budgets: Budgets) -> UserBudgetState:
        """The user's budgets in force and what the user spent today and this month."""
        return await budgets.state(await keys.get(key_id), user)

    @router.get("/keys/{key_id}/users/budgets")
    async def users_with_budgets(key_id: str, keys: Keys, budgets: Budgets
                                 ) -> list[UserBudgetState]:
        """Every user of the key with budgets of their own."""
        return await budgets.states(await keys.get(key_id))


def _abuse_routes(router: APIRouter, Keys: Any, redis: Callable[[], Redis], layout: RedisKeys,
                  settings: Settings) -> None:
    """Abuse policies of keys and the monitor's actions (:mod:`cluster.gate.monitor`)."""
    async def user_actions() -> AsyncIterator[UserActions]:
        with store_errors():
            yield UserActions(redis(), layout)

    async def action_log() -> AsyncIterator[ActionLog]:
        with store_errors():
            yield ActionLog(redis(), layout)

    Actions = Annotated[UserActions, Depends(user_actions)]
    Log = Annotated[ActionLog, Depends(action_log)]

    @router.put("/keys/{key_id}/abuse-policy")
    async def set_abuse_policy(key_id: str, body: PolicyBody, keys: Keys) -> KeyRecord:
        return await keys.set_policy(key_id, AbusePolicy(**body.model_dump()))

    @router.post("/keys/{key_id}/users/lift")
    async def lift_user(key_id: str, body: UserRef, request: Request, keys: Keys,
                        actions: Actions) -> Lifted:
        """Lift a live throttle or block of the user; the monitor then leaves the user alone
        for the rules' longest window."""
        await keys.get(key_id)
        entry = await actions.lift(key_id, body.user, f"api:{client_of(request)}",
                                   lift_hold_minutes(settings.abuse))
        return Lifted(ok=entry is not None, lifted=entry)

    @router.get("/abuse/actions")
    async def abuse_actions(log: Log, key_id: str | None = None,
                            limit: Annotated[int, Query(ge=1, le=10_000)] = 50
                            ) -> list[ActionEntry]:
        """The actions recorded (flagged, throttled, blocked, expired, lifted), newest first;
        ``live`` marks those in force now."""
        return await log.recent(key_id, limit)
