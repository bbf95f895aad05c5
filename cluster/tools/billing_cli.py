"""``cluster keys budget``, ``cluster users budget`` and ``cluster usage``: USD budgets of
keys and of named users, and the usage ledger exported for billing
(:mod:`cluster.gate.ledger`)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated, Literal, TextIO

import typer
from redis.asyncio import Redis
from rich.table import Table

from cluster.gate.keys import BUDGET_FIELDS, KeyBudgets, KeyRecord, KeyStore
from cluster.gate.ledger import FIELDS, LedgerEntry, UsageLedger
from cluster.gate.spend import SpendStore
from cluster.gate.user_budgets import UserBudget, UserBudgets, UserBudgetState
from cluster.tools.admin_cli import (
    KeyId,
    RedisUrl,
    audited,
    console,
    fail,
    keys_app,
    run,
    usd,
    users_app,
)

usage_app = typer.Typer(no_args_is_help=True, help="The usage ledger: one entry per request.")

Usd = Annotated[float | None, typer.Option(min=0, help="USD (absent: unchanged).")]


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${usd(value)}"


def budget_table(record: KeyRecord, spent_today: int, spent_month: int) -> Table:
    b = record.budgets
    table = Table("key_id", "budget", "per key", "spent (key)", "per user")
    table.add_row(record.key_id, "day (UTC)", _usd(b.day_usd), _usd(spent_today / 1e9),
                  _usd(b.user_day_usd))
    table.add_row("", "month (UTC)", _usd(b.month_usd), _usd(spent_month / 1e9),
                  _usd(b.user_month_usd))
    return table


async def _budgets(r: Redis, key_id: str, budgets: KeyBudgets, clear: list[str]
                   ) -> tuple[KeyRecord, int, int]:
    store = KeyStore(r)
    record = await store.set_budgets(key_id, budgets, clear=clear) \
        if budgets.encoded() or clear else await store.get(key_id)
    today, month = await SpendStore(r).budget_spend(key_id)
    return record, today, month


@keys_app.command("budget")
def set_budget(key_id: KeyId, redis_url: RedisUrl = None, day_usd: Usd = None,
               month_usd: Usd = None, user_day_usd: Usd = None, user_month_usd: Usd = None,
               clear: Annotated[list[str] | None, typer.Option(
                   help=f"Remove a budget: {', '.join(BUDGET_FIELDS)} (repeat).")] = None,
               ) -> None:
    """Show or set a key's USD budgets per UTC day and month, for the key and for each of
    its users. Over budget, requests get 429 insufficient_quota until the period resets."""
    bad = set(clear or ()) - set(BUDGET_FIELDS)
    if bad:
        fail(f"--clear takes {', '.join(BUDGET_FIELDS)}; not {', '.join(sorted(bad))}")
    budgets = KeyBudgets(day_usd=day_usd, month_usd=month_usd, user_day_usd=user_day_usd,
                         user_month_usd=user_month_usd)
    detail = budgets.model_dump(exclude_none=True) | {"clear": clear or []}
    changes = bool(budgets.encoded() or clear)
    work = (lambda r: audited(r, "set_budgets", key_id, detail,
                              _budgets(r, key_id, budgets, clear or []))) if changes \
        else (lambda r: _budgets(r, key_id, budgets, []))
    console.print(budget_table(*run(redis_url, work)))


def user_budget_table(states: list[UserBudgetState]) -> Table:
    table = Table("user", "budget", "in force", "own", "spent")
    for st in states:
        own = st.own or UserBudget()
        table.add_row(st.user, "day (UTC)", _usd(st.day_usd), _usd(own.day_usd),
                      _usd(st.spent_today_usd))
        table.add_row("", "month (UTC)", _usd(st.month_usd), _usd(own.month_usd),
                      _usd(st.spent_this_month_usd))
    return table


async def _user_budgets(r: Redis, key_id: str, user: str | None,
                        change: tuple[UserBudget, list[str]] | None) -> list[UserBudgetState]:
    record, store = await KeyStore(r).get(key_id), UserBudgets(r)
    if user is None:
        return await store.states(record)
    if change is not None:
        given, clear = change
        own = (await store.get(key_id, user) or UserBudget()).model_dump()
        own |= given.model_dump(exclude_none=True) | {f: None for f in clear}
        await store.set(key_id, user, UserBudget(**own))
    return [await store.state(record, user)]


@users_app.command("budget")
def user_budget(key_id: KeyId, user: Annotated[str | None, typer.Argument(
                    help="The user (the request's `user`); absent: every user with budgets "
                         "of their own.")] = None,
                redis_url: RedisUrl = None, day_usd: Usd = None, month_usd: Usd = None,
                clear: Annotated[list[str] | None, typer.Option(
                    help="Go back to the key's per-user budget: day_usd, month_usd "
                         "(repeat).")] = None) -> None:
    """Show or set one user's own USD budgets per UTC day and month, in place of the key's
    per-user budgets (a customer on a larger plan, or a tighter cap on one user)."""
    bad = set(clear or ()) - set(UserBudget.model_fields)
    if bad:
        fail(f"--clear takes day_usd, month_usd; not {', '.join(sorted(bad))}")
    given = UserBudget(day_usd=day_usd, month_usd=month_usd)
    changes = bool(clear) or not given.empty
    if user is None and changes:
        fail("name the USER whose budgets to set")
    if user is None or not changes:
        states = run(redis_url, lambda r: _user_budgets(r, key_id, user, None))
    else:
        detail = {"user": user} | given.model_dump(exclude_none=True) | {"clear": clear or []}
        states = run(redis_url, lambda r: audited(
            r, "set_user_budget", key_id, detail,
            _user_budgets(r, key_id, user, (given, clear or []))))
    console.print(user_budget_table(states))


def parse_time(value: str) -> dt.datetime:
    """ISO 8601 (a date, or a date and time; UTC unless it says otherwise)."""
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        fail(f"not an ISO 8601 time: {value!r} (e.g. 2026-12-01 or 2026-12-01T12:00:00Z)")
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


class Writer:
    """Rows out as they are read (a month of traffic need not fit in memory)."""

    def __init__(self, fmt: str, out: TextIO) -> None:
        self.out, self.count, self.cost_nano = out, 0, 0
        self.csv = csv.DictWriter(out, fieldnames=list(FIELDS)) if fmt == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def write(self, entry: LedgerEntry) -> None:
        row = entry.model_dump()
        if self.csv:
            self.csv.writerow(row)
        else:
            self.out.write(json.dumps(row, separators=(",", ":")) + "\n")
        self.count, self.cost_nano = self.count + 1, self.cost_nano + entry.cost_nano


async def _export(r: Redis, since: dt.datetime, until: dt.datetime, key: str | None,
                  writer: Writer) -> None:
    async for entry in UsageLedger(r).entries(int(since.timestamp() * 1000),
                                              int(until.timestamp() * 1000), key):
        writer.write(entry)


@usage_app.command("export")
def export(since: Annotated[str, typer.Option(help="From this time (ISO 8601, UTC).")],
           until: Annotated[str, typer.Option(help="Until this time, excluded.")],
           redis_url: RedisUrl = None,
           fmt: Annotated[Literal["csv", "jsonl"], typer.Option("--format")] = "csv",
           key: Annotated[str | None, typer.Option(help="Only this key id.")] = None,
           output: Annotated[Path | None, typer.Option(help="File (default: stdout).")] = None,
           ) -> None:
    """Every request settled in [SINCE, UNTIL): time, key, user, model, endpoint, tokens
    (prompt, completion, cached), cost (USD and nano-USD), status, latency, outcome."""
    start, end = parse_time(since), parse_time(until)
    if end <= start:
        fail("--until must be after --since")
    if output is None:
        run(redis_url, lambda r: _export(r, start, end, key, Writer(fmt, sys.stdout)))
        return
    with output.open("w", newline="") as f:
        writer = Writer(fmt, f)
        run(redis_url, lambda r: _export(r, start, end, key, writer))
    console.print(f"{writer.count} requests, ${writer.cost_nano / 1e9:.6f}, written to "
                  f"{output}")


def mount(app: typer.Typer) -> None:
    app.add_typer(usage_app, name="usage")
