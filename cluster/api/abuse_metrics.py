"""The abuse monitor's metrics, through Ray's metrics API (as the ingress's own).

:class:`RayAbuseMetrics` is the :class:`cluster.gate.monitor.MonitorObserver` of an ingress
replica. Only the replica that holds the evaluator lease reports flagged users and live
actions; every other replica writes zeros, so ``max`` or ``sum`` over replicas is the
cluster's figure and a replica that lost the lease leaves no stale series behind.
``ray_cluster_abuse_evaluator_leader`` is 1 on the leader and 0 elsewhere: its sum over
replicas should be 1.

The gauges are rewritten every ``refresh_s`` (Ray drops a series not written for two export
intervals, and the monitor evaluates every 30 s by default); a ``(key_id, rule)`` series
seen once stays at 0 afterwards rather than disappearing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cluster.api.metrics import (
    ABUSE_ACTIONS,
    ABUSE_FLAGGED,
    ABUSE_LEADER,
    ABUSE_LIVE,
    CounterLike,
    GaugeLike,
)

log = logging.getLogger(__name__)

LIVE_KINDS = ("throttle", "block")


@dataclass(frozen=True)
class AbuseInstruments:
    flagged: GaugeLike
    live: GaugeLike
    actions: CounterLike
    leader: GaugeLike


def _keys(*names: str) -> Any:
    return names  # Ray annotates tag keys Tuple[str] but takes any length


def _build() -> AbuseInstruments:
    from ray.serve.metrics import Counter, Gauge

    return AbuseInstruments(
        flagged=Gauge(ABUSE_FLAGGED, "Users flagged by an abuse rule now, per key and rule "
                      "(from the evaluating replica; 0 elsewhere).",
                      tag_keys=_keys("key_id", "rule")),
        live=Gauge(ABUSE_LIVE, "Users with a live abuse action (throttle, block), from the "
                   "evaluating replica.", tag_keys=_keys("action")),
        actions=Counter(ABUSE_ACTIONS, "Abuse actions recorded by the monitor (flagged, "
                        "throttled, blocked, expired).", tag_keys=_keys("action")),
        leader=Gauge(ABUSE_LEADER, "1 on the ingress replica that evaluates the abuse rules."),
    )


_instruments: AbuseInstruments | None = None


def ray_abuse_instruments() -> AbuseInstruments:
    """Registered once per process."""
    global _instruments
    if _instruments is None:
        _instruments = _build()
    return _instruments


class RayAbuseMetrics:
    """A :class:`~cluster.gate.monitor.MonitorObserver` exporting Ray metrics."""

    def __init__(self, instruments: AbuseInstruments | None = None,
                 refresh_s: float | None = 5.0) -> None:
        self.m = instruments or ray_abuse_instruments()
        self._lock = threading.Lock()  # the monitor's event loop vs the refresher thread
        self._leader = False
        self._flagged: dict[tuple[str, str], int] = {}
        self._seen: set[tuple[str, str]] = set()
        self._live: dict[str, int] = {}
        self.refresh()
        if refresh_s:
            threading.Thread(target=self._refresh_every, args=(refresh_s,), daemon=True,
                             name="abuse-metrics-refresh").start()

    def leading(self, leader: bool) -> None:
        with self._lock:
            self._leader = leader
            if not leader:
                self._flagged, self._live = {}, {}
        self._guarded(self.refresh)

    def evaluated(self, flagged: Mapping[tuple[str, str], int], live: Mapping[str, int]
                  ) -> None:
        with self._lock:
            self._flagged, self._live = dict(flagged), dict(live)
            self._seen |= set(flagged)
        self._guarded(self.refresh)

    def recorded(self, action: str) -> None:
        self._guarded(lambda: self.m.actions.inc(1, {"action": action}))

    def refresh(self) -> None:
        """Rewrite every gauge from the last report."""
        with self._lock:
            leader, flagged, live = self._leader, dict(self._flagged), dict(self._live)
            seen = set(self._seen)
        self.m.leader.set(int(leader), {})
        for key_id, rule in seen:
            self.m.flagged.set(flagged.get((key_id, rule), 0), {"key_id": key_id, "rule": rule})
        for kind in LIVE_KINDS:
            self.m.live.set(live.get(kind, 0), {"action": kind})

    @staticmethod
    def _guarded(work: Callable[[], object]) -> None:
        try:
            work()
        except Exception:  # metrics must not fail the monitor
            log.exception("recording abuse metrics failed")

    def _refresh_every(self, period_s: float) -> None:
        while True:
            time.sleep(period_s)
            self._guarded(self.refresh)
