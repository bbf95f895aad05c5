"""The abuse monitor: one evaluator for the whole cluster, which acts on flagged users.

Every ingress replica runs :meth:`AbuseMonitor.run` in the background. Each period
(``AbuseRules.evaluate_every_s``) it tries to hold the lease ``RedisKeys.abuse_leader()``:
``SET NX PX`` takes a free lease, and its holder renews it with a compare-and-renew
snippet (a replica never extends a lease it lost). Only the holder evaluates. A clean
shutdown releases the lease (compare-and-delete), so another replica takes over at its next
period; a replica that dies without releasing is replaced once its lease
(``leader_lease_s``, 3 periods by default) runs out. The lease lives in Redis, so no
replica restart, placement or count matters.

An evaluation (:meth:`AbuseMonitor.evaluate_once`):

1. deletes the users' actions that have ended (``expired`` is logged for a throttle or a
   block; flags and lifts end silently);
2. evaluates the rules (:meth:`cluster.gate.abuse.AbuseStore.flagged`) over every key;
3. applies, to each flagged user, the key's policy (the record's ``abuse_*`` fields, else
   the settings' defaults): ``flag`` records it once per ``window`` (a ``flag`` entry that
   admission ignores), ``throttle`` and ``block`` write an entry that admission enforces
   for ``minutes``. A user with a live action as strong, or whose action an operator lifted,
   is left alone (:mod:`cluster.gate.actions`). Requests without ``user`` are only flagged:
   acting on them would act on the whole key (limit or block the key for that).

Errors never end the loop: a Redis outage is logged once and the next period tries again.
What the monitor sees goes to a :class:`MonitorObserver` (the ingress exports it as
metrics), which keeps this module free of Ray and FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cluster.config.settings import AbuseAction, AbuseRules
from cluster.errors import KeyNotFound
from cluster.gate.abuse import AbuseStore, Flag
from cluster.gate.actions import EVENT_OF, LIFTABLE, ActionEntry, UserAction, UserActions, now_ms
from cluster.gate.keys import ANONYMOUS, AbusePolicy, KeyStore
from cluster.gate.redis_keys import RedisKeys
from cluster.gate.store import UNAVAILABLE

log = logging.getLogger(__name__)

# KEYS: the lease. ARGV: token, lease ms. Renews only a lease this replica still holds.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: the lease. ARGV: token. Deletes only a lease this replica still holds.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLease:
    """A lease in Redis that one holder at a time keeps by renewing it."""

    def __init__(self, redis: Redis, name: str, token: str, lease_s: float) -> None:
        self.redis, self.name, self.token = redis, name, token
        self.lease_ms = max(1, int(lease_s * 1000))
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self.held = False

    async def hold(self) -> bool:
        """Renew the lease if this replica holds it, else take it if free; whether this
        replica holds it now. The renewal compares the token, so it is tried whatever
        ``held`` says (after an error mid-period the lease may still be ours)."""
        renewed = bool(await self._renew(keys=[self.name], args=[self.token, self.lease_ms]))
        self.held = renewed or bool(await self.redis.set(self.name, self.token, nx=True,
                                                         px=self.lease_ms))
        return self.held

    async def release(self) -> bool:
        """Give the lease up now (clean shutdown): another replica takes it at once."""
        held, self.held = self.held, False
        return held and bool(await self._release(keys=[self.name], args=[self.token]))

    async def holder(self) -> str | None:
        """The token of the replica that holds the lease (``<replica>:<random>``)."""
        return cast(str | None, await self.redis.get(self.name))


class MonitorObserver(Protocol):
    """What the monitor reports (the ingress turns it into metrics)."""

    def leading(self, leader: bool) -> None:
        """Whether this replica holds the lease (False while Redis is unreachable)."""

    def evaluated(self, flagged: Mapping[tuple[str, str], int], live: Mapping[str, int]
                  ) -> None:
        """After each period: users flagged per (key_id, rule), live actions per action
        (``throttle``, ``block``); both empty on a replica that is not the leader."""

    def recorded(self, action: str) -> None:
        """One action logged by this replica (flagged, throttled, blocked, expired)."""


class NullObserver:
    def leading(self, leader: bool) -> None:
        pass

    def evaluated(self, flagged: Mapping[tuple[str, str], int], live: Mapping[str, int]
                  ) -> None:
        pass

    def recorded(self, action: str) -> None:
        pass


@dataclass(frozen=True)
class Policy:
    """A key's policy with the defaults filled in."""

    action: AbuseAction
    throttle_rpm: int
    minutes: int

    @classmethod
    def of(cls, policy: AbusePolicy | None, rules: AbuseRules) -> Policy:
        p = policy or AbusePolicy()
        return cls(action=p.action or rules.default_action,
                   throttle_rpm=p.throttle_rpm or rules.throttle_rpm,
                   minutes=p.minutes or rules.action_minutes)


@dataclass
class Evaluation:
    """What one evaluation found and did."""

    flags: list[Flag] = field(default_factory=list)
    recorded: list[ActionEntry] = field(default_factory=list)
    live: dict[str, int] = field(default_factory=dict)  # throttle/block -> users

    def flagged_counts(self) -> dict[tuple[str, str], int]:
        return dict(Counter((f.key_id, f.rule) for f in self.flags))


class AbuseMonitor:
    """The evaluator of one replica; only the lease holder evaluates (see the module)."""

    def __init__(self, redis: Redis, rules: AbuseRules, keys: RedisKeys | None = None,
                 replica: str = "", observer: MonitorObserver | None = None) -> None:
        self.redis = redis
        self.rules = rules
        self.keys = keys or RedisKeys()
        self.replica = replica or secrets.token_hex(4)
        self.actor = f"monitor:{self.replica}"
        self.observer: MonitorObserver = observer or NullObserver()
        self.lease = LeaderLease(redis, self.keys.abuse_leader(),
                                 f"{self.replica}:{secrets.token_hex(4)}", rules.lease_s)
        self.abuse = AbuseStore(redis, rules, self.keys)
        self.actions = UserActions(redis, self.keys)
        self.evaluations = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False  # in an outage: logged once

    @property
    def leader(self) -> bool:
        return self.lease.held

    # --- the loop

    def start(self) -> asyncio.Task[None]:
        """Run in the background on the running event loop."""
        if self._task is None or self._task.done():
            self._stop.clear()
            self._task = asyncio.get_running_loop().create_task(self.run(),
                                                                name="abuse-monitor")
        return self._task

    async def stop(self, release: bool = True) -> None:
        """End the loop; ``release`` gives the lease up at once (False: as if the replica
        died, the lease runs out)."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if release:
            try:
                await self.lease.release()
            except (RedisError, *UNAVAILABLE):
                log.warning("abuse monitor: could not release the leader lease; it expires "
                            "in %.0f s", self.rules.lease_s)
        self.lease.held = False
        self.observer.leading(False)

    async def run(self) -> None:
        """Every period: hold or take the lease, evaluate if held. Never raises."""
        while not self._stop.is_set():
            await self._period()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.rules.evaluate_every_s)

    async def _period(self) -> None:
        try:
            await self.tick()
        except (RedisError, *UNAVAILABLE) as e:
            if not self._failing:
                log.warning("abuse monitor: Redis unreachable (%s); retrying every %.0f s",
                            e, self.rules.evaluate_every_s)
            self._failing = True
            self.lease.held = False  # unknown: take it again (or not) when Redis is back
            self.observer.leading(False)
            self.observer.evaluated({}, {})
            return
        except Exception:  # a bug must not end the monitor, nor the replica
            log.exception("abuse monitor: evaluation failed")
            return
        if self._failing:
            log.info("abuse monitor: Redis reachable again")
            self._failing = False

    async def tick(self) -> Evaluation | None:
        """One period: the evaluation if this replica holds the lease, else None."""
        was = self.lease.held
        leader = await self.lease.hold()
        if leader != was:
            log.info("abuse monitor: replica %s %s the evaluator", self.replica,
                     "is now" if leader else "is no longer")
        self.observer.leading(leader)
        if not leader:
            self.observer.evaluated({}, {})
            return None
        evaluation = await self.evaluate_once()
        self.observer.evaluated(evaluation.flagged_counts(), evaluation.live)
        return evaluation

    # --- one evaluation

    async def evaluate_once(self) -> Evaluation:
        """Expire ended actions, evaluate the rules and apply the keys' policies (whether
        this replica leads or not: :meth:`tick` decides that)."""
        self.evaluations += 1
        key_ids = [*sorted(cast(set[str], await self.redis.smembers(self.keys.index()))),
                   ANONYMOUS]
        now = await now_ms(self.redis)
        out = Evaluation()
        live = await self._expire(key_ids, now, out)
        out.flags = await self.abuse.flagged()
        policies: dict[str, Policy] = {}
        for (key_id, user), flags in _by_user(out.flags).items():
            if key_id not in policies:
                policies[key_id] = await self._policy(key_id)
            entry = await self._act(key_id, user, flags, policies[key_id], now)
            if entry is not None:
                out.recorded.append(entry)
                if entry.action != "flagged":
                    live[(key_id, user)] = "throttle" if entry.action == "throttled" else "block"
        out.live = {kind: sum(1 for k in live.values() if k == kind) for kind in LIFTABLE}
        for entry in out.recorded:
            self.observer.recorded(entry.action)
        return out

    async def _policy(self, key_id: str) -> Policy:
        try:
            record = await KeyStore(self.redis, self.keys).get(key_id)
        except KeyNotFound:  # the anonymous key, or a key deleted by hand
            return Policy.of(None, self.rules)
        return Policy.of(record.policy, self.rules)

    async def _expire(self, key_ids: list[str], now: int, out: Evaluation
                      ) -> dict[tuple[str, str], str]:
        """Delete ended entries; the live throttles and blocks that remain."""
        live: dict[tuple[str, str], str] = {}
        for key_id, entries in (await self.actions.of_keys(key_ids)).items():
            for user, raw in entries.items():
                act = UserAction.decode(raw)
                if act is not None and act.live(now):
                    if act.action in LIFTABLE:
                        live[(key_id, user)] = act.action
                    continue
                entry = None
                if act is not None and act.action in LIFTABLE:
                    entry = ActionEntry(at_ms=now, key_id=key_id, user=user, action="expired",
                                        rule=act.rule, detail=f"{act.action} ended",
                                        until_ms=act.until_ms, rpm=act.rpm, actor=self.actor)
                if await self.actions.expire(key_id, user, raw, entry) and entry:
                    out.recorded.append(entry)
        return live

    async def _act(self, key_id: str, user: str, flags: list[Flag], policy: Policy,
                   now: int) -> ActionEntry | None:
        """Apply ``policy`` to a flagged user; the entry logged, or None if nothing new."""
        r = self.rules
        kind: AbuseAction = policy.action if user else "flag"
        if kind == "flag":
            until = now + max(r.burst_window_minutes, r.window_minutes) * 60_000
        else:
            until = now + policy.minutes * 60_000
        rpm = policy.throttle_rpm if kind == "throttle" else 0
        first = flags[0]
        detail = "; ".join(f"{f.rule}: {f.detail}" for f in flags) if len(flags) > 1 \
            else first.detail
        action = UserAction(action=kind, rpm=rpm, until_ms=until, rule=first.rule, at_ms=now)
        entry = ActionEntry(at_ms=now, key_id=key_id, user=user, action=EVENT_OF[kind],
                            rule=first.rule, detail=detail, until_ms=until, rpm=rpm,
                            actor=self.actor)
        applied = await self.actions.apply(key_id, user, action, entry, now)
        return entry if applied else None


def _by_user(flags: list[Flag]) -> dict[tuple[str, str], list[Flag]]:
    users: dict[tuple[str, str], list[Flag]] = {}
    for f in flags:
        users.setdefault((f.key_id, f.user), []).append(f)
    return users
