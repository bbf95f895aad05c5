"""Budgets and the usage ledger from the operator's side: ``cluster keys budget``,
``cluster usage export`` and the admin API's ``/admin/keys/{id}/budgets`` and
``/admin/usage``, against the real test Redis."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cluster.api.errors import status_of
from cluster.errors import ClusterError
from cluster.gate.contract import Outcome, Usage
from cluster.gate.redis_keys import RedisKeys
from tests.limits_support import fresh_names, open_gate, settings, spec
from tests.support.admin import ADMIN, admin_app
from tests.test_cli_admin import cli

MODEL = spec()
COST = MODEL.pricing.cost(10, 5)  # 20_000 nano-dollars


def spend_once(redis_url: str, names: RedisKeys, key: str, user: str = "u") -> int:
    """One request admitted and settled at COST through a fresh gate; its status."""
    async def go() -> int:
        async with open_gate(redis_url, names) as gate:
            try:
                granted = await gate.admit(api_key=key, user=user, model=MODEL,
                                           reserve_tokens=15, reserve_cost=COST)
            except ClusterError as e:
                return status_of(e)
            await gate.settle(granted, Usage(10, 5, COST), Outcome.ok)
            return 200
    return asyncio.run(go())


def new_key(redis_url: str) -> tuple[str, str]:
    result = cli(redis_url, "keys", "create", "billing", "--rpm", "0", "--max-concurrent", "0")
    assert result.exit_code == 0, result.output
    secret = re.search(r"^(sk-\S+)$", result.output, re.M)
    key_id = re.search(r"(key_[0-9a-f]{16})", result.output)
    assert secret and key_id
    return secret.group(1), key_id.group(1)


def test_cli_sets_a_day_budget_that_admission_enforces(redis_url: str) -> None:
    key, key_id = new_key(redis_url)
    result = cli(redis_url, "keys", "budget", key_id, "--day-usd", f"{2 * COST}",
                 "--user-month-usd", "5")
    assert result.exit_code == 0, result.output
    listed = cli(redis_url, "keys", "list").output
    row = next(line for line in listed.splitlines() if key_id in line)
    assert row.split("│")[-2].strip() == "day 0.00004, user/month 5"
    assert "$0.00004" in result.output and "$5" in result.output
    statuses = [spend_once(redis_url, RedisKeys(), key) for _ in range(3)]
    assert statuses == [200, 200, 429]
    shown = cli(redis_url, "keys", "budget", key_id)
    assert "$0.00004" in shown.output.split("day (UTC)")[1].split("\n")[0]  # spent = budget
    cleared = cli(redis_url, "keys", "budget", key_id, "--clear", "day_usd")
    assert cleared.exit_code == 0 and spend_once(redis_url, RedisKeys(), key) == 200
    assert "set_budgets" in cli(redis_url, "audit", "--action", "set_budgets").output
    assert cli(redis_url, "keys", "budget", key_id, "--clear", "rpm").exit_code == 1


def test_usage_export_writes_every_request_as_csv_and_jsonl(redis_url: str, tmp_path: Path
                                                            ) -> None:
    key, key_id = new_key(redis_url)
    for user in ("alice", "bob", "alice"):
        assert spend_once(redis_url, RedisKeys(), key, user) == 200
    out = tmp_path / "usage.csv"
    result = cli(redis_url, "usage", "export", "--since", "2020-01-01", "--until",
                 "2100-01-01", "--key", key_id, "--output", str(out))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["user"] for r in rows] == ["alice", "bob", "alice"]
    assert {r["cost_nano"] for r in rows} == {"20000"} and "3 requests" in result.output
    jsonl = cli(redis_url, "usage", "export", "--since", "2020-01-01", "--until",
                "2100-01-01", "--key", key_id, "--format", "jsonl")
    lines = [json.loads(line) for line in jsonl.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 3 and all(x["key_id"] == key_id for x in lines)
    bad = cli(redis_url, "usage", "export", "--since", "2030-01-01", "--until", "2020-01-01")
    assert bad.exit_code == 1 and "after" in bad.output


@pytest.fixture
def client(redis_url: str) -> Iterator[tuple[TestClient, RedisKeys]]:
    names = fresh_names()
    with TestClient(admin_app(redis_url, names, settings())) as c:
        yield c, names


def test_admin_api_budgets_and_usage_pages(client: tuple[TestClient, RedisKeys],
                                           redis_url: str) -> None:
    c, names = client
    made = c.post("/admin/keys", headers=ADMIN, json={
        "name": "b", "limits": {"rpm": 0}, "budgets": {"user_day_usd": COST}})
    assert made.status_code == 201, made.text
    key, key_id = made.json()["key"], made.json()["record"]["key_id"]
    assert made.json()["record"]["budgets"]["user_day_usd"] == pytest.approx(COST)
    assert [spend_once(redis_url, names, key, "alice") for _ in range(2)] == [200, 429]
    assert spend_once(redis_url, names, key, "bob") == 200
    patched = c.patch(f"/admin/keys/{key_id}/budgets", headers=ADMIN,
                      json={"month_usd": 10, "clear": ["user_day_usd"]})
    assert patched.status_code == 200, patched.text
    assert patched.json()["budgets"] == {"day_usd": None, "month_usd": 10.0,
                                         "user_day_usd": None, "user_month_usd": None}
    assert spend_once(redis_url, names, key, "alice") == 200
    state = c.get(f"/admin/keys/{key_id}/budgets", headers=ADMIN).json()
    assert state["budgets"]["month_usd"] == 10.0
    assert state["spent_today_usd"] == state["spent_this_month_usd"] == pytest.approx(3 * COST)
    assert c.get("/admin/keys/key_0000000000000000/budgets", headers=ADMIN).status_code == 404
    assert c.patch(f"/admin/keys/{key_id}/budgets", headers=ADMIN,
                   json={"day_usd": -1}).status_code == 400
    page = c.get("/admin/usage", headers=ADMIN, params={
        "since": "2020-01-01T00:00:00Z", "until": "2100-01-01T00:00:00", "limit": 2})
    assert page.status_code == 200, page.text
    first = page.json()
    assert len(first["entries"]) == 2 and first["next_cursor"]
    rest = c.get("/admin/usage", headers=ADMIN, params={
        "since": "2020-01-01", "until": "2100-01-01", "cursor": first["next_cursor"]}).json()
    assert [e["user"] for e in first["entries"] + rest["entries"]] == ["alice", "bob", "alice"]
    assert rest["next_cursor"] is None
    assert c.get("/admin/usage", params={"since": "2020-01-01", "until": "2100-01-01"}
                 ).status_code == 401
    backwards = c.get("/admin/usage", headers=ADMIN,
                      params={"since": "2030-01-01", "until": "2020-01-01"})
    assert backwards.status_code == 400


def test_cli_gives_one_user_budgets_of_their_own(redis_url: str) -> None:
    key, key_id = new_key(redis_url)
    assert cli(redis_url, "keys", "budget", key_id, "--user-day-usd", f"{COST}").exit_code == 0
    given = cli(redis_url, "users", "budget", key_id, "vip", "--day-usd", f"{3 * COST}")
    assert given.exit_code == 0, given.output
    assert "$0.00006" in given.output.split("day (UTC)")[1].split("\n")[0]  # in force
    statuses = [spend_once(redis_url, RedisKeys(), key, "vip") for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert [spend_once(redis_url, RedisKeys(), key, "plain") for _ in range(2)] == [200, 429]
    listed = cli(redis_url, "users", "budget", key_id)
    assert "vip" in listed.output and "plain" not in listed.output
    assert "set_user_budget" in cli(redis_url, "audit", "--action", "set_user_budget").output
    cleared = cli(redis_url, "users", "budget", key_id, "vip", "--clear", "day_usd")
    assert cleared.exit_code == 0 and "vip" not in cli(redis_url, "users", "budget",
                                                        key_id).output
    assert spend_once(redis_url, RedisKeys(), key, "vip") == 429  # the key's $0.00002 again
    assert cli(redis_url, "users", "budget", key_id, "--day-usd", "1").exit_code == 1
    assert cli(redis_url, "users", "budget", key_id, "u", "--clear", "rpm").exit_code == 1


def test_admin_api_sets_and_shows_a_users_own_budgets(client: tuple[TestClient, RedisKeys],
                                                      redis_url: str) -> None:
    c, names = client
    made = c.post("/admin/keys", headers=ADMIN, json={
        "name": "u", "limits": {"rpm": 0}, "budgets": {"user_day_usd": COST}})
    key, key_id = made.json()["key"], made.json()["record"]["key_id"]
    put = c.put(f"/admin/keys/{key_id}/users/budget", headers=ADMIN,
                json={"user": "vip", "day_usd": 2 * COST, "month_usd": 1.0})
    assert put.status_code == 200, put.text
    assert put.json()["day_usd"] == pytest.approx(2 * COST) and put.json()["month_usd"] == 1.0
    assert [spend_once(redis_url, names, key, "vip") for _ in range(3)] == [200, 200, 429]
    shown = c.get(f"/admin/keys/{key_id}/users/budget", headers=ADMIN,
                  params={"user": "vip"}).json()
    assert shown["spent_today_usd"] == pytest.approx(2 * COST)
    assert shown["own"] == {"day_usd": pytest.approx(2 * COST), "month_usd": 1.0}
    other = c.get(f"/admin/keys/{key_id}/users/budget", headers=ADMIN,
                  params={"user": "other"}).json()
    assert other["own"] is None and other["day_usd"] == pytest.approx(COST)
    listed = c.get(f"/admin/keys/{key_id}/users/budgets", headers=ADMIN).json()
    assert [s["user"] for s in listed] == ["vip"]
    assert c.put(f"/admin/keys/{key_id}/users/budget", headers=ADMIN,
                 json={"user": "vip", "day_usd": "5"}).status_code == 400
    assert c.put("/admin/keys/key_0000000000000000/users/budget", headers=ADMIN,
                 json={"user": "vip"}).status_code == 404
    removed = c.put(f"/admin/keys/{key_id}/users/budget", headers=ADMIN, json={"user": "vip"})
    assert removed.json()["own"] is None
    assert c.get(f"/admin/keys/{key_id}/users/budgets", headers=ADMIN).json() == []
