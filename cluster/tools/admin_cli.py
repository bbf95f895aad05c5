"""``cluster keys|users|spend|audit``: operate keys, users and spend in Redis directly.

Every command takes ``--redis-url`` (or ``CLUSTER_REDIS_URL``). A created key is printed
once; Redis keeps only its hash. Every change is written to the audit log
(:mod:`cluster.gate.audit`), as the admin API's are.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from cluster.api.errors import status_of
from cluster.config.settings import Settings
from cluster.errors import ClusterError
from cluster.gate.abuse import AbuseStore
from cluster.gate.actions import ActionEntry, ActionLog, UserActions, lift_hold_minutes
from cluster.gate.audit import AuditLog
from cluster.gate.keys import LIMIT_FIELDS, AbusePolicy, CreatedKey, KeyLimits, KeyRecord, KeyStore
from cluster.gate.spend import SpendStore
from cluster.gate.store import make_client, store_errors

T = TypeVar("T")

keys_app = typer.Typer(no_args_is_help=True, help="Create, list, revoke, limit, block API keys.")
users_app = typer.Typer(no_args_is_help=True,
                        help="Top and flagged users; block users; abuse actions, lifted.")
spend_app = typer.Typer(help="Spend per key and day.")
console = Console()

RedisUrl = Annotated[str | None, typer.Option("--redis-url", envvar="CLUSTER_REDIS_URL",
                                              help="Redis URL.")]
KeyId = Annotated[str, typer.Argument(help="The key id (key_...), never the secret.")]
Rpm = Annotated[int | None, typer.Option(help="Requests per minute (0: no limit).")]
Tpm = Annotated[int | None, typer.Option(help="Tokens per minute (0: no limit).")]
Conc = Annotated[int | None, typer.Option(help="Concurrent requests (0: no limit).")]
URpm = Annotated[int | None, typer.Option(help="Requests per minute per user.")]
UTpm = Annotated[int | None, typer.Option(help="Tokens per minute per user.")]
Models = Annotated[list[str] | None, typer.Option("--model", help="Allowed model (repeat).")]


def run(redis_url: str | None, work: Callable[[Redis], Awaitable[T]]) -> T:
    """Run ``work`` with a client; turn store errors into a message and exit code 1."""
    url = redis_url or Settings().redis_url
    if not url:
        fail("no Redis: pass --redis-url or set CLUSTER_REDIS_URL")
    found: str = url

    async def main() -> T:
        client = make_client(found, timeout=5.0)
        try:
            with store_errors():
                return await work(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except ClusterError as e:  # the admin API would answer the same status and code
        fail(f"{e.message} ({status_of(e)} {e.code})")


def actor() -> str:
    """Who runs the CLI, for the audit log."""
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


async def audited(r: Redis, action: str, target: str, detail: dict[str, Any],
                  work: Awaitable[T]) -> T:
    """Run a change, then append it to the audit log (as the admin API does)."""
    result = await work
    await AuditLog(r).record(actor(), action, target, detail)
    return result


def fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def _limit(value: int | None, default: str) -> str:
    if value is None:
        return default
    return "none" if value == 0 else str(value)


def key_table(records: list[KeyRecord]) -> Table:
    table = Table("key_id", "name", "status", "rpm", "tpm", "concurrent", "user rpm",
                  "user tpm", "models", "budgets (USD)")
    for r in records:
        status = "revoked" if r.revoked else "blocked" if r.blocked else "active"
        lim = r.limits
        table.add_row(r.key_id, r.name, status, _limit(lim.rpm, "default"),
                      _limit(lim.tpm, "default"), _limit(lim.max_concurrent, "default"),
                      _limit(lim.user_rpm, "-"), _limit(lim.user_tpm, "-"),
                      ",".join(r.models) if r.models else "all", budget_summary(r))
    return table


def usd(value: float) -> str:
    """Dollars to the nano-dollar, without trailing zeros: ``5``, ``0.00004``."""
    return f"{value:,.9f}".rstrip("0").rstrip(".")


def budget_summary(record: KeyRecord) -> str:
    """``day 20, month 400, user/day 1`` or ``-``."""
    b = record.budgets
    parts = [f"{name} {usd(value)}" for name, value in (
        ("day", b.day_usd), ("month", b.month_usd), ("user/day", b.user_day_usd),
        ("user/month", b.user_month_usd)) if value is not None]
    return ", ".join(parts) or "-"


def model_table(rows: list[BaseModel], columns: list[str]) -> Table:
    table = Table(*columns)
    for row in rows:
        data = row.model_dump()
        table.add_row(*(str(data[c]) if data[c] != "" else "(none)" for c in columns))
    return table


@keys_app.command("create")
def create_key(name: str, redis_url: RedisUrl = None, rpm: Rpm = None, tpm: Tpm = None,
               max_concurrent: Conc = None, user_rpm: URpm = None, user_tpm: UTpm = None,
               model: Models = None) -> None:
    """Create a key; its secret is printed once."""
    limits = KeyLimits(rpm=rpm, tpm=tpm, max_concurrent=max_concurrent, user_rpm=user_rpm,
                       user_tpm=user_tpm)
    async def create(r: Redis) -> CreatedKey:
        created = await KeyStore(r).create(name, limits, model or None)
        detail = {"name": name, "limits": limits.model_dump(exclude_none=True),
                  "models": model or None}
        await AuditLog(r).record(actor(), "create_key", created.record.key_id, detail)
        return created

    created = run(redis_url, create)
    console.print(key_table([created.record]))
    console.print("API key (shown once, store it now):")
    print(created.secret)


@keys_app.command("list")
def list_keys(redis_url: RedisUrl = None,
              active: Annotated[bool, typer.Option(help="Hide revoked keys.")] = False) -> None:
    """List keys (ids, names, limits; never secrets)."""
    console.print(key_table(run(redis_url, lambda r: KeyStore(r).list_keys(not active))))


@keys_app.command("revoke")
def revoke_key(key_id: KeyId, redis_url: RedisUrl = None) -> None:
    """Revoke a key: 401 on every replica from its next request."""
    console.print(key_table([run(redis_url, lambda r: audited(
        r, "revoke_key", key_id, {}, KeyStore(r).revoke(key_id)))]))


@keys_app.command("limits")
def set_limits(key_id: KeyId, redis_url: RedisUrl = None, rpm: Rpm = None, tpm: Tpm = None,
               max_concurrent: Conc = None, user_rpm: URpm = None, user_tpm: UTpm = None,
               model: Models = None,
               all_models: Annotated[bool, typer.Option(help="Allow every model.")] = False,
               clear: Annotated[list[str] | None, typer.Option(
                   help=f"Back to the default: {', '.join(LIMIT_FIELDS)} (repeat).")] = None,
               ) -> None:
    """Set a key's limits and allowed models."""
    limits = KeyLimits(rpm=rpm, tpm=tpm, max_concurrent=max_concurrent, user_rpm=user_rpm,
                       user_tpm=user_tpm)
    bad = set(clear or ()) - set(LIMIT_FIELDS)
    if bad:
        fail(f"--clear takes {', '.join(LIMIT_FIELDS)}; not {', '.join(sorted(bad))}")
    detail = limits.model_dump(exclude_none=True) | {
        "clear": clear or [], "models": model or None, "all_models": all_models}
    record = run(redis_url, lambda r: audited(r, "set_limits", key_id, detail, KeyStore(
        r).set_limits(key_id, limits, clear=clear or (), models=model or None,
                      all_models=all_models)))
    console.print(key_table([record]))


@keys_app.command("block")
def block_key(key_id: KeyId, redis_url: RedisUrl = None) -> None:
    """Block a key: 403 key_blocked until unblocked."""
    console.print(key_table([run(redis_url, lambda r: audited(
        r, "block_key", key_id, {}, KeyStore(r).set_blocked(key_id, True)))]))


@keys_app.command("unblock")
def unblock_key(key_id: KeyId, redis_url: RedisUrl = None) -> None:
    """Unblock a key."""
    console.print(key_table([run(redis_url, lambda r: audited(
        r, "unblock_key", key_id, {}, KeyStore(r).set_blocked(key_id, False)))]))


@keys_app.command("policy")
def set_policy(key_id: KeyId, redis_url: RedisUrl = None,
               action: Annotated[str | None, typer.Option(
                   help="What the abuse monitor does to a flagged user: flag (record only), "
                        "throttle or block.")] = None,
               throttle_rpm: Annotated[int | None, typer.Option(
                   min=1, help="Requests/min of a throttled user.")] = None,
               minutes: Annotated[int | None, typer.Option(
                   min=1, help="How long a throttle or block lasts.")] = None) -> None:
    """Set the key's abuse policy (an option left out: the settings' default)."""
    if action not in (None, "flag", "throttle", "block"):
        fail(f"--action takes flag, throttle or block; not {action!r}")
    policy = AbusePolicy.model_validate({"action": action, "throttle_rpm": throttle_rpm,
                                         "minutes": minutes})
    record = run(redis_url, lambda r: audited(
        r, "set_abuse_policy", key_id, policy.model_dump(),
        KeyStore(r).set_policy(key_id, policy)))
    rules = Settings().abuse
    p = record.policy or AbusePolicy()
    table = Table("key_id", "action", "throttle rpm", "minutes")
    table.add_row(record.key_id, p.action or f"{rules.default_action} (default)",
                  str(p.throttle_rpm or f"{rules.throttle_rpm} (default)"),
                  str(p.minutes or f"{rules.action_minutes} (default)"))
    console.print(table)


def _abuse(r: Redis) -> AbuseStore:
    return AbuseStore(r, Settings().abuse)


@users_app.command("top")
def top_users(key_id: KeyId, redis_url: RedisUrl = None,
              minutes: Annotated[int, typer.Option(min=1)] = 60,
              by: Annotated[str, typer.Option(help="tokens|requests|rejected|errors")] = "tokens",
              limit: Annotated[int, typer.Option(min=1)] = 10) -> None:
    """The key's top users over the last MINUTES."""
    rows = run(redis_url, lambda r: _abuse(r).top_users(key_id, minutes, by, limit))
    console.print(model_table(list(rows), ["user", "requests", "tokens", "rejected",
                                           "rate_limited", "errors", "disconnected",
                                           "max_length"]))


@users_app.command("flagged")
def flagged_users(redis_url: RedisUrl = None,
                  key: Annotated[str | None, typer.Option(help="Only this key id.")] = None
                  ) -> None:
    """Users that break an abuse rule now, with the rule."""
    rows = run(redis_url, lambda r: _abuse(r).flagged(key))
    console.print(model_table(list(rows), ["key_id", "user", "rule", "detail"]))


async def _block_user(r: Redis, key_id: str, user: str) -> None:
    await KeyStore(r).get(key_id)  # refuse unknown key ids
    await _abuse(r).block_user(key_id, user)


@users_app.command("block")
def block_user(key_id: KeyId, user: str, redis_url: RedisUrl = None) -> None:
    """Block USER of a key: 403 user_blocked from the next request."""
    run(redis_url, lambda r: audited(r, "block_user", f"{key_id} user={user}", {"user": user},
                                     _block_user(r, key_id, user)))
    console.print(f"blocked user {user!r} of {key_id}")


@users_app.command("unblock")
def unblock_user(key_id: KeyId, user: str, redis_url: RedisUrl = None) -> None:
    """Unblock USER of a key."""
    was = run(redis_url, lambda r: audited(r, "unblock_user", f"{key_id} user={user}",
                                           {"user": user}, _abuse(r).unblock_user(key_id, user)))
    console.print(f"unblocked user {user!r} of {key_id}" if was else f"{user!r} was not blocked")


@users_app.command("blocked")
def blocked_users(key_id: KeyId, redis_url: RedisUrl = None) -> None:
    """The blocked users of a key."""
    for user in run(redis_url, lambda r: _abuse(r).blocked_users(key_id)):
        print(user)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else ""


def action_table(entries: list[ActionEntry]) -> Table:
    table = Table("when (UTC)", "key_id", "user", "action", "rule", "until (UTC)", "rpm",
                  "live", "actor", "detail")
    for e in entries:
        table.add_row(_when(e.at_ms), e.key_id, e.user or "(none)", e.action, e.rule,
                      _when(e.until_ms), str(e.rpm) if e.rpm else "",
                      "live" if e.live else "", e.actor, e.detail)
    return table


@users_app.command("actions")
def user_actions(redis_url: RedisUrl = None,
                 key: Annotated[str | None, typer.Option(help="Only this key id.")] = None,
                 limit: Annotated[int, typer.Option(min=1, help="Newest to show.")] = 50
                 ) -> None:
    """What the abuse monitor did (flagged, throttled, blocked, expired) and operators lifted,
    newest first; "live" marks the actions in force now."""
    console.print(action_table(run(redis_url, lambda r: ActionLog(r).recent(key, limit))))


async def _lift(r: Redis, key_id: str, user: str) -> ActionEntry | None:
    await KeyStore(r).get(key_id)  # refuse unknown key ids
    return await UserActions(r).lift(key_id, user, actor(),
                                     lift_hold_minutes(Settings().abuse))


@users_app.command("lift")
def lift_user(key_id: KeyId, user: str, redis_url: RedisUrl = None) -> None:
    """Lift the live throttle or block of USER; the monitor leaves the user alone for the
    rules' longest window."""
    entry = run(redis_url, lambda r: audited(r, "lift_user", f"{key_id} user={user}",
                                             {"user": user}, _lift(r, key_id, user)))
    if entry is None:
        console.print(f"{user!r} of {key_id} has no live throttle or block")
        return
    console.print(f"lifted the {entry.detail.split()[0]} of {user!r} of {key_id}; the "
                  f"monitor leaves the user alone until {_when(entry.until_ms)} UTC")


@spend_app.callback(invoke_without_command=True)
def spend(redis_url: RedisUrl = None,
          key: Annotated[str | None, typer.Option(help="Only this key id.")] = None,
          days: Annotated[int, typer.Option(min=1)] = 7) -> None:
    """Requests, tokens and estimated cost per key and UTC day."""
    rows = run(redis_url, lambda r: SpendStore(r).spend(key, days))
    table = model_table(list(rows), ["key_id", "date", "requests", "prompt_tokens",
                                     "completion_tokens", "cost", "errors", "disconnected"])
    table.add_section()
    table.add_row("total", "", str(sum(r.requests for r in rows)),
                  str(sum(r.prompt_tokens for r in rows)),
                  str(sum(r.completion_tokens for r in rows)),
                  f"{sum(r.cost for r in rows):.6f}", "", "")
    console.print(table)


def audit(redis_url: RedisUrl = None,
          limit: Annotated[int, typer.Option(min=1, help="Newest entries to show.")] = 50,
          action: Annotated[str | None, typer.Option(
              help="Only this action (create_key, revoke_key, set_limits, block_key, "
                   "unblock_key, block_user, unblock_user, set_abuse_policy, lift_user, "
                   "denied, locked_out).")] = None,
          ) -> None:
    """The audit log: who changed what and when (admin API and CLI), newest first."""
    entries = run(redis_url, lambda r: AuditLog(r).recent(limit, action))
    table = Table("when (UTC)", "who", "action", "target", "detail")
    for e in entries:
        when = datetime.fromtimestamp(e.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(when, e.actor, e.action, e.target,
                      json.dumps(e.detail, sort_keys=True) if e.detail else "")
    console.print(table)


def mount(app: typer.Typer) -> None:
    """Add ``keys``, ``users``, ``spend`` and ``audit`` to the main CLI."""
    app.add_typer(keys_app, name="keys")
    app.add_typer(users_app, name="users")
    app.add_typer(spend_app, name="spend")
    app.command("audit")(audit)
