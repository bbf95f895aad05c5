"""``cluster keys|users|spend`` through typer's CliRunner against the real test server."""

from __future__ import annotations

import asyncio
import getpass
import re

import pytest
from typer.testing import CliRunner, Result

from cluster.api.errors import status_of
from cluster.errors import ClusterError
from cluster.gate.contract import Outcome, Usage
from cluster.gate.redis_keys import RedisKeys
from cluster.tools.cli import app
from tests.limits_support import open_gate, spec

runner = CliRunner()


def cli(redis_url: str, *args: str) -> Result:
    result = runner.invoke(app, list(args), env={"CLUSTER_REDIS_URL": redis_url,
                                                 "COLUMNS": "200"})
    return result


def request_status(redis_url: str, key: str, user: str | None = None) -> int:
    async def go() -> int:
        async with open_gate(redis_url, RedisKeys()) as gate:  # the CLI's default prefix
            try:
                granted = await gate.admit(api_key=key, user=user, model=spec(),
                                           reserve_tokens=10)
            except ClusterError as e:
                return status_of(e)
            await gate.settle(granted, Usage(4, 2, 0.125), Outcome.ok)
            return 200
    return asyncio.run(go())


@pytest.fixture
def created(redis_url: str) -> tuple[str, str]:
    result = cli(redis_url, "keys", "create", "cli-test", "--rpm", "5", "--model",
                 "acme/model-a", "--model", "acme/model-b")
    assert result.exit_code == 0, result.output
    secret = re.search(r"^(sk-\S+)$", result.output, re.M)
    key_id = re.search(r"(key_[0-9a-f]{16})", result.output)
    assert secret and key_id
    return secret.group(1), key_id.group(1)


def test_create_list_limits_revoke(redis_url: str, created: tuple[str, str]) -> None:
    secret, key_id = created
    assert request_status(redis_url, secret) == 200
    listed = cli(redis_url, "keys", "list")
    assert listed.exit_code == 0 and key_id in listed.output
    assert secret not in listed.output  # printed once, at creation only

    limits = cli(redis_url, "keys", "limits", key_id, "--rpm", "0", "--all-models")
    assert limits.exit_code == 0 and "none" in limits.output and "all" in limits.output
    bad = cli(redis_url, "keys", "limits", key_id, "--clear", "nonsense")
    assert bad.exit_code == 1 and "--clear" in bad.output

    assert cli(redis_url, "keys", "block", key_id).exit_code == 0
    assert request_status(redis_url, secret) == 403
    assert cli(redis_url, "keys", "unblock", key_id).exit_code == 0
    assert request_status(redis_url, secret) == 200
    revoked = cli(redis_url, "keys", "revoke", key_id)
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert request_status(redis_url, secret) == 401
    assert key_id not in cli(redis_url, "keys", "list", "--active").output


def test_users_and_spend(redis_url: str, created: tuple[str, str]) -> None:
    secret, key_id = created
    for user in ("carol", "carol", "dave"):
        assert request_status(redis_url, secret, user) == 200
    top = cli(redis_url, "users", "top", key_id, "--by", "requests")
    assert top.exit_code == 0
    assert top.output.index("carol") < top.output.index("dave")

    assert cli(redis_url, "users", "block", key_id, "dave").exit_code == 0
    assert cli(redis_url, "users", "blocked", key_id).output.split() == ["dave"]
    assert request_status(redis_url, secret, "dave") == 403
    assert "unblocked" in cli(redis_url, "users", "unblock", key_id, "dave").output
    assert request_status(redis_url, secret, "dave") == 200
    assert cli(redis_url, "users", "flagged", "--key", key_id).exit_code == 0

    spend = cli(redis_url, "spend", "--key", key_id)
    assert spend.exit_code == 0
    row = next(line for line in spend.output.splitlines() if key_id in line)
    assert re.search(r"\b4\b.*\b16\b.*\b8\b.*0\.5\b", row), row  # requests, tokens, cost


def test_errors_are_messages_not_tracebacks(redis_url: str) -> None:
    missing = cli(redis_url, "keys", "revoke", "key_0000000000000000")
    assert missing.exit_code == 1 and "No API key with id" in missing.output
    unknown_user_key = cli(redis_url, "users", "block", "key_0000000000000000", "x")
    assert unknown_user_key.exit_code == 1
    down = runner.invoke(app, ["keys", "list", "--redis-url", "redis://127.0.0.1:1/0"])
    assert down.exit_code == 1 and "(Redis) is unreachable" in down.output


def test_cli_changes_are_in_the_audit_log(redis_url: str, created: tuple[str, str]) -> None:
    _, key_id = created
    assert cli(redis_url, "users", "block", key_id, "eve").exit_code == 0
    shown = cli(redis_url, "audit", "--limit", "5")
    assert shown.exit_code == 0, shown.output
    rows = [line for line in shown.output.splitlines() if key_id in line]
    assert "block_user" in rows[0] and "create_key" in rows[1]  # newest first
    assert all(f"cli:{getpass.getuser()}@" in row for row in rows[:2])
    only = cli(redis_url, "audit", "--action", "block_user", "--limit", "1")
    assert "block_user" in only.output and "create_key" not in only.output
