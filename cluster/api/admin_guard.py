"""What every admin route goes through: the lockout, the admin key (constant time, before
the body is read), unknown query parameters refused, and each change written to the audit
log (:mod:`cluster.gate.audit`)."""

import json
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.dependencies.utils import get_flat_dependant
from fastapi.routing import APIRoute
from redis.asyncio import Redis

from cluster.config.settings import Settings
from cluster.errors import InvalidRequest, RateLimited, Unauthenticated
from cluster.gate.audit import AdminLockout, AuditLog
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.store import store_errors


def known_query(request: Request) -> None:
    """A query parameter the route does not take is a 400, not silently ignored (a typo such
    as `?day=30` would otherwise answer for the default)."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = {p.alias for p in get_flat_dependant(route.dependant).query_params}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise InvalidRequest(f"Unknown query parameter {unknown[0]!r}; this route takes "
                             f"{', '.join(sorted(known)) or 'none'}.", param=unknown[0])


def client_of(request: Request) -> str:
    """The client's address as the ingress sees it (behind HAProxy: HAProxy's)."""
    return request.client.host if request.client else "unknown"


def _json_object(raw: bytes | memoryview) -> dict[str, Any]:
    try:
        data = json.loads(bytes(raw) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def _change(request: Request, response: Response) -> tuple[str, dict[str, Any]]:
    """What an admin request changed: its target (key id, user) and its fields (never the
    response, which holds a new key's secret)."""
    body = _json_object(await request.body())
    created = _json_object(response.body).get("record", {})
    target = str(request.path_params.get("key_id") or created.get("key_id", ""))
    if "user" in body:
        target = f"{target} user={body['user']}"
    return target, body


def admin_route(redis: Callable[[], Redis], layout: RedisKeys,
                settings: Settings) -> type[APIRoute]:
    """The route class of the admin router (``APIRouter(route_class=...)``)."""
    admin_key = settings.admin_key.get_secret_value().encode() if settings.admin_key else b""

    def valid_key(request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return bool(admin_key) and scheme.lower() == "bearer" and secrets.compare_digest(
            given.strip().encode(), admin_key)

    async def guard(request: Request, audit: AuditLog) -> None:
        """Before anything of the request is read (a body that is not JSON is a 401 too): a
        locked-out client is refused, then the admin key is compared in constant time."""
        client = client_of(request)
        lockout = AdminLockout(redis(), layout, settings.admin_max_failures,
                               settings.admin_lockout_s)
        wait = await lockout.retry_after(client)
        if wait is not None:
            raise RateLimited(f"Too many refused admin requests from this client; retry in "
                              f"{wait}s.", code="admin_locked_out", retry_after_s=wait)
        if valid_key(request):
            return
        await audit.record(f"api:{client}", "denied",
                           detail={"method": request.method, "path": request.url.path})
        if await lockout.failed(client):
            await audit.record(f"api:{client}", "locked_out",
                               detail={"for_s": settings.admin_lockout_s})
        raise Unauthenticated("A valid admin key is required (Authorization: Bearer "
                              "<admin key>).", code="invalid_admin_key")

    class AdminRoute(APIRoute):
        """Guards every admin route and writes each change it makes to the audit log."""

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handle = super().get_route_handler()
            action = self.name

            async def guarded(request: Request) -> Response:
                with store_errors():
                    audit = AuditLog(redis(), layout)
                    await guard(request, audit)
                response = await handle(request)
                if request.method != "GET" and response.status_code < 400:
                    with store_errors():
                        await audit.record(f"api:{client_of(request)}", action,
                                           *await _change(request, response))
                return response

            return guarded

    return AdminRoute
