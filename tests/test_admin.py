"""The /admin router through FastAPI's TestClient, with gates checking its effects."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cluster.api.errors import status_of
from cluster.config.settings import Settings
from cluster.errors import ClusterError
from cluster.gate.audit import AuditLog
from cluster.gate.contract import Outcome, Usage
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.store import make_client
from tests.limits_support import open_gate, settings, spec
from tests.support.admin import ADMIN, admin_app


@pytest.fixture
def client(redis_url: str, names: RedisKeys) -> Iterator[TestClient]:
    with TestClient(admin_app(redis_url, names, settings())) as c:
        yield c


def request_status(redis_url: str, names: RedisKeys, key: str, user: str | None = None,
                   model: str = "acme/model-a", settle_cost: float = 0.0) -> int:
    """One request through a fresh gate (a replica of its own)."""
    async def go() -> int:
        async with open_gate(redis_url, names) as gate:
            try:
                granted = await gate.admit(api_key=key, user=user, model=spec(model),
                                           reserve_tokens=10)
            except ClusterError as e:
                return status_of(e)
            await gate.settle(granted, Usage(7, 3, settle_cost), Outcome.ok)
            return 200
    return asyncio.run(go())


def test_admin_key_is_required(redis_url: str, names: RedisKeys, client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "admin"}):
        r = client.get("/admin/keys", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_admin_key"
    with TestClient(admin_app(redis_url, names, Settings(admin_key=None))) as no_admin:
        assert no_admin.get("/admin/keys", headers=ADMIN).status_code == 401


def test_key_lifecycle(redis_url: str, names: RedisKeys, client: TestClient) -> None:
    r = client.post("/admin/keys", headers=ADMIN,
                    json={"name": "team-a", "limits": {"rpm": 2}, "models": ["acme/model-a"]})
    assert r.status_code == 201
    secret, record = r.json()["key"], r.json()["record"]
    assert secret.startswith("sk-") and record["limits"]["rpm"] == 2
    key_id = record["key_id"]

    listed = client.get("/admin/keys", headers=ADMIN)
    assert [k["key_id"] for k in listed.json()] == [key_id]
    assert secret not in listed.text and "hash" not in listed.text  # shown once, never again

    assert request_status(redis_url, names, secret) == 200
    assert request_status(redis_url, names, secret, model="acme/model-b") == 403
    r = client.patch(f"/admin/keys/{key_id}/limits", headers=ADMIN,
                     json={"rpm": 0, "all_models": True})
    assert r.json()["limits"]["rpm"] == 0 and r.json()["models"] is None
    assert request_status(redis_url, names, secret, model="acme/model-b") == 200

    assert client.post(f"/admin/keys/{key_id}/block", headers=ADMIN).json()["blocked"]
    assert request_status(redis_url, names, secret) == 403
    assert not client.post(f"/admin/keys/{key_id}/unblock", headers=ADMIN).json()["blocked"]
    assert client.post(f"/admin/keys/{key_id}/revoke", headers=ADMIN).json()["revoked"]
    assert request_status(redis_url, names, secret) == 401

    missing = client.post("/admin/keys/key_nope/revoke", headers=ADMIN)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "key_not_found")
    bad = client.patch(f"/admin/keys/{key_id}/limits", headers=ADMIN, json={"rpm": -1})
    assert bad.status_code == 400


def test_users_and_spend(redis_url: str, names: RedisKeys, client: TestClient) -> None:
    created = client.post("/admin/keys", headers=ADMIN, json={"name": "k"}).json()
    secret, key_id = created["key"], created["record"]["key_id"]
    for user in ("ann", "ann", "bob"):
        assert request_status(redis_url, names, secret, user=user, settle_cost=0.5) == 200

    top = client.get(f"/admin/keys/{key_id}/users/top", headers=ADMIN,
                     params={"by": "requests", "minutes": 5}).json()
    assert [(u["user"], u["requests"], u["tokens"]) for u in top] == \
        [("ann", 2, 20), ("bob", 1, 10)]

    r = client.post(f"/admin/keys/{key_id}/users/block", headers=ADMIN, json={"user": "bob"})
    assert r.json() == {"ok": True}
    assert client.get(f"/admin/keys/{key_id}/users/blocked", headers=ADMIN).json() == ["bob"]
    assert request_status(redis_url, names, secret, user="bob") == 403
    assert request_status(redis_url, names, secret, user="ann") == 200
    client.post(f"/admin/keys/{key_id}/users/unblock", headers=ADMIN, json={"user": "bob"})
    assert request_status(redis_url, names, secret, user="bob") == 200

    assert client.get("/admin/users/flagged", headers=ADMIN,
                      params={"key_id": key_id}).json() == []
    [day] = client.get("/admin/spend", headers=ADMIN, params={"key_id": key_id}).json()
    assert (day["requests"], day["prompt_tokens"], day["completion_tokens"]) == (5, 35, 15)
    assert day["cost"] == pytest.approx(1.5)
    assert client.get("/admin/spend", headers=ADMIN, params={"days": 0}).status_code == 400


def audit_entries(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    r = client.get("/admin/audit", headers=ADMIN, params=params)
    assert r.status_code == 200, r.text
    entries: list[dict[str, Any]] = r.json()
    return entries


def test_every_change_is_in_the_audit_log_without_secrets(client: TestClient) -> None:
    created = client.post("/admin/keys", headers=ADMIN, json={"name": "audited"}).json()
    key_id = created["record"]["key_id"]
    client.patch(f"/admin/keys/{key_id}/limits", headers=ADMIN, json={"rpm": 7})
    client.post(f"/admin/keys/{key_id}/users/block", headers=ADMIN, json={"user": "mallory"})
    client.post(f"/admin/keys/{key_id}/revoke", headers=ADMIN)
    client.get("/admin/keys", headers=ADMIN)  # a read is not a change
    entries = audit_entries(client)
    assert [(e["action"], e["target"]) for e in entries] == [
        ("revoke_key", key_id), ("block_user", f"{key_id} user=mallory"),
        ("set_limits", key_id), ("create_key", key_id)]  # newest first
    assert {e["actor"] for e in entries} == {"api:testclient"}
    assert entries[2]["detail"] == {"rpm": 7}
    assert created["key"] not in json.dumps(entries)  # a new key's secret is never logged
    assert all(time.time() - 60 < e["at"] <= time.time() for e in entries)


def test_a_client_guessing_the_admin_key_is_locked_out(redis_url: str,
                                                       names: RedisKeys) -> None:
    conf = settings().model_copy(update={"admin_max_failures": 3, "admin_lockout_s": 60})
    with TestClient(admin_app(redis_url, names, conf)) as client:
        for guess in ("a", "b", "c"):
            r = client.get("/admin/keys", headers={"Authorization": f"Bearer {guess}"})
            assert r.status_code == 401
        locked = client.get("/admin/keys", headers=ADMIN)  # the right key, too late
        assert locked.status_code == 429, locked.text
        assert locked.json()["error"]["code"] == "admin_locked_out"
        assert 1 <= int(locked.headers["retry-after"]) <= 60
        not_json = client.post("/admin/keys", headers=ADMIN, content=b"{")
        assert not_json.status_code == 429  # refused before the body is read
    async def read() -> list[str]:
        async with make_client(redis_url) as r:
            return [e.action for e in await AuditLog(r, names).recent(10)]

    assert asyncio.run(read()) == ["locked_out", "denied", "denied", "denied"]
