"""The abuse monitor on a real Redis: one leader, the keys' policies applied, expiry, lifts,
outages and what it reports to its observer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from pydantic import ValidationError

from cluster.api.abuse_metrics import AbuseInstruments, RayAbuseMetrics
from cluster.config.settings import AbuseRules
from cluster.gate.actions import ActionEntry, ActionLog, UserAction, UserActions, now_ms
from cluster.gate.keys import AbusePolicy, KeyStore
from cluster.gate.monitor import AbuseMonitor
from cluster.gate.redis_gate import RedisGate
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.store import make_client
from tests.limits_support import fresh_names, open_gate, settings
from tests.test_abuse import RULES, send
from tests.test_metrics import Recorder

pytestmark = pytest.mark.asyncio(loop_scope="session")

FAST = RULES | {"evaluate_every_s": 0.2, "leader_lease_s": 0.6}
MINUTE_MS = 60_000


class Observer:
    """A MonitorObserver that keeps what it was told."""

    def __init__(self) -> None:
        self.leader: list[bool] = []
        self.flagged: Mapping[tuple[str, str], int] = {}
        self.live: Mapping[str, int] = {}
        self.actions: list[str] = []

    def leading(self, leader: bool) -> None:
        self.leader.append(leader)

    def evaluated(self, flagged: Mapping[tuple[str, str], int], live: Mapping[str, int]
                  ) -> None:
        self.flagged, self.live = flagged, live

    def recorded(self, action: str) -> None:
        self.actions.append(action)


def rules(**overrides: Any) -> AbuseRules:
    return AbuseRules(**(FAST | overrides))


def monitor(gate: RedisGate, names: RedisKeys, replica: str, **overrides: Any
            ) -> AbuseMonitor:
    return AbuseMonitor(gate.redis, rules(**overrides), names, replica=replica,
                        observer=Observer())


@contextlib.asynccontextmanager
async def key_with(redis_url: str, policy: AbusePolicy | None = None
                   ) -> AsyncIterator[tuple[RedisGate, RedisKeys, str, str]]:
    """A gate on a prefix of its own and a key (with ``policy``): gate, names, secret, id."""
    names = fresh_names()
    async with open_gate(redis_url, names, settings(abuse=FAST)) as gate:
        keys = KeyStore(gate.redis, names)
        created = await keys.create("k")
        if policy is not None:
            await keys.set_policy(created.record.key_id, policy)
        yield gate, names, created.secret, created.record.key_id


async def live_of(gate: RedisGate, names: RedisKeys, key_id: str) -> dict[str, UserAction]:
    raw = await UserActions(gate.redis, names).of_keys([key_id])
    return {u: a for u, v in raw.get(key_id, {}).items() if (a := UserAction.decode(v))}


# --- settings


async def test_lease_defaults_to_three_periods_and_must_outlive_one() -> None:
    assert AbuseRules().evaluate_every_s == 30 and AbuseRules().lease_s == 90
    assert AbuseRules(evaluate_every_s=2).leader_lease_s == 6
    assert AbuseRules().default_action == "flag" and AbuseRules().throttle_rpm == 10
    with pytest.raises(ValidationError):
        AbuseRules(evaluate_every_s=5, leader_lease_s=5)
    with pytest.raises(ValidationError):
        AbuseRules(default_action="ban")


# --- the leader lease


async def test_one_monitor_evaluates_and_another_takes_over(redis_url: str) -> None:
    async with key_with(redis_url) as (gate, names, _, _):
        one, two = monitor(gate, names, "one"), monitor(gate, names, "two")
        assert await one.tick() is not None and await two.tick() is None
        assert (await one.lease.holder() or "").startswith("one:")

        one.start()
        two.start()
        await asyncio.sleep(1.0)  # about 5 periods each
        assert one.leader and not two.leader
        assert two.evaluations == 0 and one.evaluations >= 4

        await one.stop(release=False)  # dies: the lease stays until it runs out
        assert (await one.lease.holder() or "").startswith("one:")
        died = time.monotonic()
        while not two.leader and time.monotonic() - died < 3:
            await asyncio.sleep(0.05)
        took = time.monotonic() - died
        assert two.leader and two.evaluations >= 1
        assert 0.3 < took < 1.5, took  # after the 0.6 s lease, at the next 0.2 s period
        await two.stop(release=True)  # a clean stop frees the lease at once
        assert await two.lease.holder() is None
        three = monitor(gate, names, "three")
        assert await three.tick() is not None
        await three.stop()
        assert isinstance(two.observer, Observer) and two.observer.leader[-1] is False


async def test_a_monitor_never_renews_a_lease_it_lost(redis_url: str) -> None:
    async with key_with(redis_url) as (gate, names, _, _):
        one, two = monitor(gate, names, "one"), monitor(gate, names, "two")
        assert await one.lease.hold()
        await gate.redis.delete(names.abuse_leader())  # lapsed (or an operator reset it)
        assert await two.lease.hold()
        assert not await one.lease.hold() and not await one.lease.release()
        assert (await two.lease.holder() or "").startswith("two:")


# --- policies applied


async def test_throttle_policy_throttles_the_bursting_user_only(redis_url: str) -> None:
    policy = AbusePolicy(action="throttle", throttle_rpm=5, minutes=30)
    async with key_with(redis_url, policy) as (gate, names, secret, key_id):
        await send(gate, secret, "burst", 8)
        await send(gate, secret, "calm", 2)
        m = monitor(gate, names, "r1")
        before = await now_ms(gate.redis)
        evaluation = await m.tick()
        assert evaluation is not None
        assert [(e.user, e.action, e.rule) for e in evaluation.recorded] == \
            [("burst", "throttled", "burst")]

        live = await live_of(gate, names, key_id)
        assert set(live) == {"burst"}
        act = live["burst"]
        assert (act.action, act.rpm, act.rule) == ("throttle", 5, "burst")
        assert before <= act.at_ms and act.until_ms == act.at_ms + 30 * MINUTE_MS
        raw = await gate.redis.hget(names.user_actions(key_id), "burst")
        assert raw is not None and " " not in raw  # compact JSON, as admission reads it

        [entry] = await ActionLog(gate.redis, names).recent(key_id)
        assert (entry.action, entry.user, entry.rule, entry.rpm, entry.until_ms, entry.actor,
                entry.live) == ("throttled", "burst", "burst", 5, act.until_ms, "monitor:r1",
                                True)
        assert "req/min" in entry.detail
        assert isinstance(m.observer, Observer)
        assert m.observer.flagged == {(key_id, "burst"): 1}
        assert m.observer.live == {"throttle": 1, "block": 0}
        assert m.observer.actions == ["throttled"]

        again = await m.evaluate_once()  # still flagged, already throttled: nothing new
        assert again.recorded == [] and again.live["throttle"] == 1
        assert len(await ActionLog(gate.redis, names).recent(key_id)) == 1


async def test_block_policy_blocks_for_its_minutes(redis_url: str) -> None:
    async with key_with(redis_url, AbusePolicy(action="block", minutes=5)) as (
            gate, names, secret, key_id):
        await send(gate, secret, "burst", 8)
        evaluation = await monitor(gate, names, "r1").evaluate_once()
        assert [e.action for e in evaluation.recorded] == ["blocked"]
        act = (await live_of(gate, names, key_id))["burst"]
        assert (act.action, act.rpm, act.until_ms - act.at_ms) == ("block", 0, 5 * MINUTE_MS)
        assert evaluation.live == {"throttle": 0, "block": 1}


async def test_the_settings_default_applies_without_a_policy(redis_url: str) -> None:
    async with key_with(redis_url) as (gate, names, secret, key_id):
        await send(gate, secret, "burst", 8)
        m = monitor(gate, names, "r1", default_action="throttle", throttle_rpm=3,
                    action_minutes=7)
        await m.evaluate_once()
        act = (await live_of(gate, names, key_id))["burst"]
        assert (act.action, act.rpm, act.until_ms - act.at_ms) == ("throttle", 3, 7 * MINUTE_MS)


async def test_flag_policy_only_records_once_per_flag(redis_url: str) -> None:
    async with key_with(redis_url, AbusePolicy(action="flag")) as (gate, names, secret, key_id):
        await send(gate, secret, "burst", 8)
        await send(gate, secret, "", 8)  # no user: only ever flagged
        m = monitor(gate, names, "r1", default_action="block")
        first = await m.evaluate_once()
        assert sorted((e.user, e.action) for e in first.recorded) == \
            [("", "flagged"), ("burst", "flagged")]
        assert (await m.evaluate_once()).recorded == []  # once per live flag
        live = await live_of(gate, names, key_id)
        assert {u: a.action for u, a in live.items()} == {"burst": "flag", "": "flag"}
        window = max(m.rules.burst_window_minutes, m.rules.window_minutes) * MINUTE_MS
        assert live["burst"].until_ms - live["burst"].at_ms == window
        assert first.live == {"throttle": 0, "block": 0}


async def test_requests_without_user_are_never_throttled(redis_url: str) -> None:
    async with key_with(redis_url, AbusePolicy(action="block")) as (gate, names, secret, _):
        await send(gate, secret, "", 8)
        evaluation = await monitor(gate, names, "r1").evaluate_once()
        assert [(e.user, e.action) for e in evaluation.recorded] == [("", "flagged")]


async def test_a_stronger_action_replaces_a_weaker_one_never_the_reverse(redis_url: str
                                                                         ) -> None:
    async with key_with(redis_url, AbusePolicy(action="flag")) as (gate, names, secret, key_id):
        keys = KeyStore(gate.redis, names)
        await send(gate, secret, "burst", 8)
        m = monitor(gate, names, "r1")
        await m.evaluate_once()
        await keys.set_policy(key_id, AbusePolicy(action="block"))
        assert [e.action for e in (await m.evaluate_once()).recorded] == ["blocked"]
        await keys.set_policy(key_id, AbusePolicy(action="throttle"))
        assert (await m.evaluate_once()).recorded == []
        assert (await live_of(gate, names, key_id))["burst"].action == "block"


# --- expiry and lifts


async def test_ended_actions_are_deleted_and_logged_as_expired(redis_url: str) -> None:
    async with key_with(redis_url) as (gate, names, _, key_id):
        actions = UserActions(gate.redis, names)
        now = await now_ms(gate.redis)
        for user, kind in (("old-throttle", "throttle"), ("old-flag", "flag")):
            ended = UserAction(action=kind, rpm=4 if kind == "throttle" else 0,
                               until_ms=now - 1, rule="burst", at_ms=now - MINUTE_MS)
            entry = ActionEntry(at_ms=ended.at_ms, key_id=key_id, user=user,
                                action="throttled" if kind == "throttle" else "flagged",
                                rule="burst", until_ms=ended.until_ms, rpm=ended.rpm,
                                actor="monitor:earlier")
            assert await actions.apply(key_id, user, ended, entry, now - MINUTE_MS)
        m = monitor(gate, names, "r1")
        evaluation = await m.evaluate_once()
        assert [(e.user, e.action, e.rpm) for e in evaluation.recorded] == \
            [("old-throttle", "expired", 4)]
        assert await live_of(gate, names, key_id) == {}
        log = await ActionLog(gate.redis, names).recent(key_id)
        assert [(e.user, e.action, e.live) for e in log] == [
            ("old-throttle", "expired", False), ("old-flag", "flagged", False),
            ("old-throttle", "throttled", False)]
        assert isinstance(m.observer, Observer) and m.observer.actions == ["expired"]


async def test_a_lift_ends_the_action_and_holds(redis_url: str) -> None:
    policy = AbusePolicy(action="throttle", throttle_rpm=2)
    async with key_with(redis_url, policy) as (gate, names, secret, key_id):
        await send(gate, secret, "burst", 8)
        m = monitor(gate, names, "r1")
        await m.evaluate_once()
        actions = UserActions(gate.redis, names)
        assert await actions.lift(key_id, "calm", "cli:op", 10) is None  # nothing to lift
        lifted = await actions.lift(key_id, "burst", "cli:op", 10)
        assert lifted is not None
        assert (lifted.action, lifted.actor, lifted.rule, lifted.detail) == \
            ("lifted", "cli:op", "burst", "throttle lifted")
        hold = (await live_of(gate, names, key_id))["burst"]
        assert hold.action == "lifted" and hold.until_ms == lifted.until_ms
        assert hold.until_ms - hold.at_ms == 10 * MINUTE_MS

        again = await m.evaluate_once()  # still flagged, but lifted: left alone
        assert again.recorded == [] and again.live == {"throttle": 0, "block": 0}
        assert await actions.lift(key_id, "burst", "cli:op", 10) is None  # already lifted
        log = await ActionLog(gate.redis, names).recent(key_id)
        assert [(e.action, e.live) for e in log] == [("lifted", True), ("throttled", False)]

        # the hold ends like any action; the monitor acts on the user again
        await gate.redis.hset(names.user_actions(key_id), "burst", UserAction(
            action="lifted", until_ms=hold.at_ms, rule="burst", at_ms=hold.at_ms).encoded())
        assert [e.action for e in (await m.evaluate_once()).recorded] == ["throttled"]


async def test_the_log_filters_by_key_and_pages(redis_url: str) -> None:
    async with key_with(redis_url) as (gate, names, _, key_id):
        actions = UserActions(gate.redis, names)
        now = await now_ms(gate.redis)
        for i in range(7):
            kid = key_id if i % 3 == 0 else "key_other"
            act = UserAction(action="flag", until_ms=now + MINUTE_MS, rule="burst", at_ms=now)
            entry = ActionEntry(at_ms=now + i, key_id=kid, user=f"u{i}", action="flagged",
                                rule="burst", actor="t")
            await actions.apply(kid, f"u{i}", act, entry, now)
        log = ActionLog(gate.redis, names)
        assert [e.user for e in await log.recent(key_id)] == ["u6", "u3", "u0"]
        assert [e.user for e in await log.recent(limit=2)] == ["u6", "u5"]
        assert [e.user for e in await log.recent(key_id, limit=2)] == ["u6", "u3"]


# --- failures and metrics


async def test_redis_down_is_logged_once_and_never_raises(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    dead = make_client("redis://127.0.0.1:1/0", timeout=0.2)
    try:
        m = AbuseMonitor(dead, rules(), fresh_names(), replica="r1", observer=Observer())
        caplog.set_level(logging.WARNING, logger="cluster.gate.monitor")
        for _ in range(3):
            await m._period()
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1
        assert not m.leader and isinstance(m.observer, Observer)
        assert m.observer.leader == [False] * 3
        m.start()
        await asyncio.sleep(0.5)
        assert m._task is not None and not m._task.done()  # still running
        await m.stop()  # the release fails quietly too
    finally:
        await dead.aclose()


async def test_the_metrics_follow_the_leader(redis_url: str) -> None:
    policy = AbusePolicy(action="throttle")
    async with key_with(redis_url, policy) as (gate, names, secret, key_id):
        await send(gate, secret, "burst", 8)
        one_i = AbuseInstruments(flagged=Recorder(), live=Recorder(), actions=Recorder(),
                                 leader=Recorder())
        two_i = AbuseInstruments(flagged=Recorder(), live=Recorder(), actions=Recorder(),
                                 leader=Recorder())
        one = AbuseMonitor(gate.redis, rules(), names, replica="one",
                           observer=RayAbuseMetrics(one_i, refresh_s=None))
        two = AbuseMonitor(gate.redis, rules(), names, replica="two",
                           observer=RayAbuseMetrics(two_i, refresh_s=None))
        await one.tick()
        await two.tick()
        rec = _recorders(one_i)
        assert rec["leader"].get() == 1 and _recorders(two_i)["leader"].get() == 0
        assert rec["flagged"].get(key_id=key_id, rule="burst") == 1
        assert rec["live"].get(action="throttle") == 1 and rec["live"].get(action="block") == 0
        assert rec["actions"].get(action="throttled") == 1
        assert _recorders(two_i)["flagged"].values == {}

        await one.stop()  # released: the other leads, the first reports zeros
        await two.tick()
        assert rec["leader"].get() == 0 and rec["flagged"].get(key_id=key_id, rule="burst") == 0
        assert rec["live"].get(action="throttle") == 0
        two_rec = _recorders(two_i)
        assert two_rec["leader"].get() == 1 and two_rec["live"].get(action="throttle") == 1
        assert two_rec["actions"].values == {}  # nothing new to record


def _recorders(instruments: AbuseInstruments) -> dict[str, Recorder]:
    out = {name: getattr(instruments, name) for name in ("flagged", "live", "actions", "leader")}
    assert all(isinstance(r, Recorder) for r in out.values())
    return out


async def test_the_ingress_starts_one_monitor_per_replica_with_redis(redis_url: str) -> None:
    from cluster.api.ingress import replica_name, start_abuse_monitor
    from cluster.gate.contract import OpenGate

    assert start_abuse_monitor(OpenGate(), settings(abuse=FAST)) is None  # no Redis
    async with key_with(redis_url) as (gate, names, _, _):
        seen = Observer()
        started = start_abuse_monitor(gate, settings(abuse=FAST), seen)
        assert started is not None and started.replica == replica_name()
        assert started.keys == names and started.actor == f"monitor:{replica_name()}"
        deadline = time.monotonic() + 2
        while not started.leader and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert started.leader and seen.leader[-1] is True
        await started.stop()
        assert seen.leader[-1] is False and await started.lease.holder() is None
