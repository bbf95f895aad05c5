"""Exactness: 200 concurrent admissions from two processes (two RedisGates, two clients,
as two ingress replicas would be) against rpm=50 admit exactly 50."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

from redis import Redis

from cluster.api.errors import status_of
from cluster.errors import ClusterError
from cluster.gate.keys import KeyLimits, KeyStore
from cluster.gate.redis_gate import RedisGate
from cluster.gate.redis_keys import RedisKeys
from tests.limits_support import RACE_TIMEOUT_S, fresh_names, settings, spec, warm

PER_PROCESS = 100
RPM = 50


def replica(url: str, prefix: str, secret: str, barrier: Any, out: Any) -> None:
    """One ingress replica: warm up, wait for the other, fire PER_PROCESS admissions."""
    out.put(asyncio.run(_fire(url, prefix, secret, barrier)))


async def _fire(url: str, prefix: str, secret: str, barrier: Any) -> dict[str, Any]:
    gate = RedisGate.from_url(url, settings(redis_timeout_s=RACE_TIMEOUT_S), RedisKeys(prefix))
    try:
        await warm(gate, PER_PROCESS)  # the race starts at the barrier
        await asyncio.to_thread(barrier.wait)
        started = time.time()  # wall clock: compared across the two processes
        results = await asyncio.gather(*(_one(gate, secret) for _ in range(PER_PROCESS)))
        return {"admitted": results.count(200), "refused": results.count(429),
                "other": [r for r in results if r not in (200, 429)],
                "start": started, "end": time.time()}
    finally:
        await gate.close()


async def _one(gate: RedisGate, secret: str) -> int:
    try:
        await gate.admit(api_key=secret, user=None, model=spec(), reserve_tokens=1)
    except ClusterError as e:
        return status_of(e)
    return 200


async def _create_key(url: str, names: RedisKeys) -> tuple[str, str]:
    from cluster.gate.store import make_client

    client = make_client(url)
    try:
        created = await KeyStore(client, names).create("race", KeyLimits(rpm=RPM))
        return created.secret, created.record.key_id
    finally:
        await client.aclose()


def test_200_concurrent_admissions_from_two_processes_admit_exactly_50(redis_url: str) -> None:
    names = fresh_names()
    secret, key_id = asyncio.run(_create_key(redis_url, names))
    ctx = mp.get_context("spawn")  # a clean interpreter each, like a separate replica
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=replica, args=(redis_url, names.prefix, secret, barrier, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [r["other"] for r in results] == [[], []]
    assert sum(r["admitted"] for r in results) == RPM
    assert sum(r["refused"] for r in results) == 2 * PER_PROCESS - RPM
    first, second = results
    assert first["start"] < second["end"] and second["start"] < first["end"], results  # raced
    log, _ = names.window(f"k:{key_id}")
    assert Redis.from_url(redis_url).zcard(log) == RPM
    print(f"exactness: admitted {sum(r['admitted'] for r in results)} of "
          f"{2 * PER_PROCESS}, per replica {[r['admitted'] for r in results]}, "
          f"burst took {max(r['end'] for r in results) - min(r['start'] for r in results):.3f} s")
