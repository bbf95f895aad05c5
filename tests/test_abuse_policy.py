"""Abuse policies and actions through KeyStore, the CLI (``cluster keys policy``, ``cluster
users actions|lift``) and the admin API, on the real test server."""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cluster.gate.actions import ActionEntry, ActionLog, UserAction, UserActions, now_ms
from cluster.gate.audit import AuditLog
from cluster.gate.keys import AbusePolicy, KeyStore
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.store import make_client
from cluster.tools.cli import app
from tests.limits_support import fresh_names, settings
from tests.support.admin import ADMIN, admin_app

runner = CliRunner()


def throttle(redis_url: str, names: RedisKeys, key_id: str, user: str, rpm: int = 3) -> None:
    """A live throttle of ``user``, as the monitor writes it."""
    async def go() -> None:
        async with make_client(redis_url) as r:
            now = await now_ms(r)
            act = UserAction(action="throttle", rpm=rpm, until_ms=now + 600_000, rule="burst",
                             at_ms=now)
            entry = ActionEntry(at_ms=now, key_id=key_id, user=user, action="throttled",
                                rule="burst", detail="40 req/min", until_ms=act.until_ms,
                                rpm=rpm, actor="monitor:test")
            assert await UserActions(r, names).apply(key_id, user, act, entry, now)
    asyncio.run(go())


def current(redis_url: str, names: RedisKeys, key_id: str, user: str) -> UserAction | None:
    async def go() -> UserAction | None:
        async with make_client(redis_url) as r:
            return await UserActions(r, names).get(key_id, user)
    return asyncio.run(go())


# --- KeyStore


@pytest.mark.asyncio(loop_scope="session")
async def test_policy_is_stored_in_the_record(redis_url: str) -> None:
    names = fresh_names()
    async with make_client(redis_url) as r:
        keys = KeyStore(r, names)
        key_id = (await keys.create("k")).record.key_id
        assert (await keys.get(key_id)).policy is None
        record = await keys.set_policy(key_id, AbusePolicy(action="throttle", throttle_rpm=5,
                                                           minutes=30))
        assert record.policy == AbusePolicy(action="throttle", throttle_rpm=5, minutes=30)
        raw = await r.hgetall(names.record(key_id))
        assert (raw["abuse_action"], raw["abuse_throttle_rpm"], raw["abuse_minutes"]) == \
            ("throttle", "5", "30")
        partial = await keys.set_policy(key_id, AbusePolicy(action="block"))  # replaces all
        assert partial.policy == AbusePolicy(action="block")
        assert "abuse_minutes" not in await r.hgetall(names.record(key_id))
        assert (await keys.set_policy(key_id, AbusePolicy())).policy is None
        assert (await keys.list_keys())[0].policy is None
    for bad in ({"action": "ban"}, {"throttle_rpm": 0}, {"minutes": 0}, {"minutes": "5"}):
        with pytest.raises(ValueError):
            AbusePolicy.model_validate(bad)


# --- the CLI (the default prefix, as the CLI uses)


def cli(redis_url: str, *args: str) -> str:
    result = runner.invoke(app, list(args), env={"CLUSTER_REDIS_URL": redis_url,
                                                 "COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def key_id(redis_url: str) -> str:
    async def go() -> str:
        async with make_client(redis_url) as r:
            return (await KeyStore(r).create("cli-abuse")).record.key_id
    return asyncio.run(go())


def test_cli_sets_a_policy_audited(redis_url: str, key_id: str) -> None:
    out = cli(redis_url, "keys", "policy", key_id, "--action", "throttle", "--throttle-rpm",
              "5", "--minutes", "30")
    row = next(line for line in out.splitlines() if key_id in line)
    assert "throttle" in row and " 5 " in row and " 30 " in row
    shown = cli(redis_url, "keys", "policy", key_id, "--action", "block")
    assert "(default)" in shown  # rpm and minutes back to the settings' defaults
    bad = runner.invoke(app, ["keys", "policy", key_id, "--action", "ban"],
                        env={"CLUSTER_REDIS_URL": redis_url})
    assert bad.exit_code == 1 and "--action" in bad.output
    audit = cli(redis_url, "audit", "--action", "set_abuse_policy", "--limit", "2")
    rows = [line for line in audit.splitlines() if key_id in line]
    assert len(rows) == 2 and f"cli:{getpass.getuser()}@" in rows[0]


def test_cli_shows_and_lifts_actions(redis_url: str, key_id: str) -> None:
    names = RedisKeys()
    throttle(redis_url, names, key_id, "mallory")
    shown = cli(redis_url, "users", "actions", "--key", key_id)
    row = next(line for line in shown.splitlines() if "mallory" in line)
    assert "throttled" in row and "burst" in row and "live" in row and "monitor:test" in row

    lifted = cli(redis_url, "users", "lift", key_id, "mallory")
    assert "lifted the throttle" in lifted
    again = cli(redis_url, "users", "lift", key_id, "mallory")
    assert "no live throttle or block" in again
    action = current(redis_url, names, key_id, "mallory")
    assert action is not None and action.action == "lifted"

    rows = [line for line in cli(redis_url, "users", "actions", "--key", key_id,
                                 "--limit", "5").splitlines() if "mallory" in line]
    assert "lifted" in rows[0] and "live" in rows[0] and f"cli:{getpass.getuser()}@" in rows[0]
    assert "throttled" in rows[1] and "live" not in rows[1]  # newest first
    audit = cli(redis_url, "audit", "--action", "lift_user", "--limit", "5")
    assert f"{key_id} user=mallory" in audit
    unknown = runner.invoke(app, ["users", "lift", "key_0000000000000000", "x"],
                            env={"CLUSTER_REDIS_URL": redis_url})
    assert unknown.exit_code == 1 and "No API key" in unknown.output


# --- the admin API


@pytest.fixture
def client(redis_url: str, names: RedisKeys) -> Iterator[TestClient]:
    with TestClient(admin_app(redis_url, names, settings())) as c:
        yield c


def test_admin_policy_actions_and_lift(redis_url: str, names: RedisKeys,
                                       client: TestClient) -> None:
    key_id = client.post("/admin/keys", headers=ADMIN, json={"name": "k"}).json()[
        "record"]["key_id"]
    r = client.put(f"/admin/keys/{key_id}/abuse-policy", headers=ADMIN,
                   json={"action": "throttle", "throttle_rpm": 5, "minutes": 30})
    assert r.status_code == 200, r.text
    assert r.json()["policy"] == {"action": "throttle", "throttle_rpm": 5, "minutes": 30}
    assert client.get(f"/admin/keys/{key_id}", headers=ADMIN).json()["policy"]["action"] == \
        "throttle"
    for bad in ({"action": "ban"}, {"throttle_rpm": 0}, {"minutes": "5"}, {"extra": 1}):
        r = client.put(f"/admin/keys/{key_id}/abuse-policy", headers=ADMIN, json=bad)
        assert r.status_code == 400, (bad, r.text)
    missing = client.put("/admin/keys/key_nope/abuse-policy", headers=ADMIN, json={})
    assert missing.status_code == 404

    throttle(redis_url, names, key_id, "eve", rpm=5)
    actions = client.get("/admin/abuse/actions", headers=ADMIN, params={"key_id": key_id})
    assert actions.status_code == 200, actions.text
    [entry] = actions.json()
    assert (entry["user"], entry["action"], entry["rule"], entry["rpm"], entry["live"]) == \
        ("eve", "throttled", "burst", 5, True)
    assert client.get("/admin/abuse/actions", headers=ADMIN,
                      params={"limit": 0}).status_code == 400

    lift = client.post(f"/admin/keys/{key_id}/users/lift", headers=ADMIN, json={"user": "eve"})
    assert lift.status_code == 200, lift.text
    body = lift.json()
    assert body["ok"] and body["lifted"]["action"] == "lifted"
    assert body["lifted"]["actor"] == "api:testclient"
    nothing = client.post(f"/admin/keys/{key_id}/users/lift", headers=ADMIN,
                          json={"user": "eve"}).json()
    assert nothing == {"ok": False, "lifted": None}
    action = current(redis_url, names, key_id, "eve")
    assert action is not None and action.action == "lifted"
    assert client.post("/admin/keys/key_nope/users/lift", headers=ADMIN,
                       json={"user": "eve"}).status_code == 404

    async def audited() -> list[tuple[str, str]]:
        async with make_client(redis_url) as r:
            return [(e.action, e.target) for e in await AuditLog(r, names).recent(10)]
    log = asyncio.run(audited())
    assert ("set_abuse_policy", key_id) in log and ("lift_user", f"{key_id} user=eve") in log

    async def recorded() -> list[str]:
        async with make_client(redis_url) as r:
            return [e.action for e in await ActionLog(r, names).recent(key_id)]
    assert asyncio.run(recorded()) == ["lifted", "throttled"]
