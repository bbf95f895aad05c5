#!/usr/bin/env python
"""The latency the rate limiter adds: admit + settle, p50 and p99, at 1 and 50 concurrent
clients, side by side with limits off (``OpenGate``), in one run, against a real Redis
this script starts (or ``--redis-url``).

Each client is a coroutine in this process doing admit -> settle in a loop, as the ingress
does per request; the figures therefore include this process's own CPU (redis-py and the
event loop), which is what an ingress replica pays. Gates measured:

- ``off``: :class:`cluster.gate.contract.OpenGate` (no keys, no limits);
- ``redis``: a key with rpm, tpm and concurrency limits, requests giving ``user``;
- ``redis+all``: also per-user limits and a global per-model TPM (three window scopes);
- ``redis+budget``: ``redis`` with USD budgets per day and month on the key and on each
  user (four budget scopes reserved at admission and charged at settlement).

Every settlement appends the request to the usage ledger (a Redis Stream), in all three.

Usage: ``python ops/bench/limiter_bench.py [--requests 3000] [--redis-url URL] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from cluster.config.catalog import ModelSpec
from cluster.config.settings import LimitDefaults, Settings
from cluster.gate.contract import Gate, OpenGate, Outcome, Usage
from cluster.gate.keys import KeyBudgets, KeyLimits, KeyStore
from cluster.gate.redis_gate import RedisGate
from cluster.gate.redis_keys import RedisKeys
from cluster.tools.redis_server import local_redis

MODEL = ModelSpec.model_validate({
    "id": "bench/model", "profile": "local", "source": {"path": "/nowhere"},
    "engine": {"max_model_len": 4096},
    "pricing": {"input_per_million": 1.0, "output_per_million": 2.0}})
BIG = 10**9  # limits that are checked on every request but never reached
USAGE = Usage(prompt_tokens=50, completion_tokens=100, estimated_cost=0.00025)
RESERVE_COST = MODEL.pricing.cost(100, 500)  # the worst case of the 600 tokens reserved
BUDGETS = KeyBudgets(day_usd=1e6, month_usd=1e6, user_day_usd=1e6, user_month_usd=1e6)
VARIANTS = ("redis", "redis+all", "redis+budget")


@dataclass
class Row:
    gate: str
    clients: int
    requests: int
    admit_p50_ms: float
    admit_p99_ms: float
    total_p50_ms: float  # admit + settle
    total_p99_ms: float
    per_second: float


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def client(gate: Gate, key: str | None, user: str, n: int,
                 admits: list[float], totals: list[float]) -> None:
    for _ in range(n):
        start = time.perf_counter()
        admission = await gate.admit(api_key=key, user=user, model=MODEL, reserve_tokens=600,
                                     reserve_cost=RESERVE_COST)
        admitted = time.perf_counter()
        await gate.settle(admission, USAGE, Outcome.ok)
        done = time.perf_counter()
        admits.append(admitted - start)
        totals.append(done - start)


async def measure(name: str, gate: Gate, key: str | None, clients: int, requests: int) -> Row:
    per_client = max(1, requests // clients)
    await asyncio.gather(*(client(gate, key, f"warm{i}", 20, [], [])
                           for i in range(clients)))  # connections, scripts
    admits: list[float] = []
    totals: list[float] = []
    start = time.perf_counter()
    await asyncio.gather(*(client(gate, key, f"user{i % 10}", per_client, admits, totals)
                           for i in range(clients)))
    elapsed = time.perf_counter() - start
    return Row(name, clients, len(totals), pct(admits, 0.5), pct(admits, 0.99),
               pct(totals, 0.5), pct(totals, 0.99), len(totals) / elapsed)


async def redis_gate(url: str, variant: str) -> tuple[RedisGate, str]:
    all_scopes = variant == "redis+all"
    model_tpm = {MODEL.id: BIG} if all_scopes else {}
    conf = Settings(limits=LimitDefaults(model_tpm=model_tpm))
    gate = RedisGate.from_url(url, conf, RedisKeys(f"bench{VARIANTS.index(variant)}:"))
    limits = KeyLimits(rpm=BIG, tpm=BIG, max_concurrent=1000,
                       user_rpm=BIG if all_scopes else None,
                       user_tpm=BIG if all_scopes else None)
    budgets = BUDGETS if variant == "redis+budget" else None
    created = await KeyStore(gate.redis, gate.keys).create("bench", limits, budgets=budgets)
    return gate, created.secret


async def drop_prefix(gate: RedisGate) -> None:
    """Delete the bench's own keys (never anything else on a given server)."""
    batch = [k async for k in gate.redis.scan_iter(match=f"{gate.keys.prefix}*", count=1000)]
    for i in range(0, len(batch), 1000):
        await gate.redis.delete(*batch[i:i + 1000])


async def server_usec_per_script(url: str) -> float:
    """Redis's own time per EVALSHA (admit and settle averaged), from INFO commandstats."""
    from cluster.gate.store import make_client

    client = make_client(url)
    try:
        stats = await client.info("commandstats")
        return float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))
    finally:
        await client.aclose()


async def run(url: str, requests: int) -> list[Row]:
    rows = []
    for clients in (1, 50):
        rows.append(await measure("off", OpenGate(), None, clients, requests))
        for variant in VARIANTS:
            gate, key = await redis_gate(url, variant)
            try:
                rows.append(await measure(variant, gate, key, clients, requests))
            finally:
                await drop_prefix(gate)  # a fresh window log for the next level
                await gate.close()
    return rows


def table(rows: list[Row]) -> str:
    head = (f"{'gate':<12} {'clients':>7} {'requests':>8} {'admit p50':>10} {'admit p99':>10} "
            f"{'a+s p50':>9} {'a+s p99':>9} {'req/s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.gate:<12} {r.clients:>7} {r.requests:>8} {r.admit_p50_ms:>8.3f}ms "
                     f"{r.admit_p99_ms:>8.3f}ms {r.total_p50_ms:>7.3f}ms "
                     f"{r.total_p99_ms:>7.3f}ms {r.per_second:>8.0f}")
    return "\n".join(lines)


def added(rows: list[Row]) -> str:
    """The limiter's cost: redis minus off, per concurrency."""
    out = []
    for clients in sorted({r.clients for r in rows}):
        off = next(r for r in rows if r.clients == clients and r.gate == "off")
        for r in rows:
            if r.clients == clients and r.gate != "off":
                out.append(f"{r.gate} at {clients} client(s) adds admit+settle "
                           f"p50 {r.total_p50_ms - off.total_p50_ms:.3f} ms, "
                           f"p99 {r.total_p99_ms - off.total_p99_ms:.3f} ms "
                           f"(admit alone p50 {r.admit_p50_ms - off.admit_p50_ms:.3f} ms)")
        base = next(r for r in rows if r.clients == clients and r.gate == "redis")
        budget = next(r for r in rows if r.clients == clients and r.gate == "redis+budget")
        out.append(f"budgets at {clients} client(s) add admit p50 "
                   f"{budget.admit_p50_ms - base.admit_p50_ms:.3f} ms, admit+settle p50 "
                   f"{budget.total_p50_ms - base.total_p50_ms:.3f} ms over redis")
    return "\n".join(out)


@contextmanager
def redis_for(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with local_redis() as server:
        yield server.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--requests", type=int, default=3000, help="per gate and level")
    parser.add_argument("--redis-url", help="use this Redis (keys under bench*: only)")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args(argv)
    with redis_for(args.redis_url) as url:
        rows = asyncio.run(run(url, args.requests))
        server_usec = asyncio.run(server_usec_per_script(url))
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows],
                          "server_usec_per_evalsha": server_usec}, indent=2))
    else:
        print(table(rows))
        print()
        print(added(rows))
        print(f"\nRedis server time per EVALSHA: {server_usec:.1f} us (the rest is the "
              f"network and this process's CPU: redis-py, hiredis, the event loop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
