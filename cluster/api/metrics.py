"""What the ingress reports about each request, and its exporter to Ray's metrics.

:class:`RayIngressMetrics` records through Ray's metrics API, so the figures show in the Ray
dashboard and on every node's Prometheus endpoint (``ray.init(_metrics_export_port=...)``,
port 8080 on KubeRay). Ray exports a metric registered as ``NAME`` as ``ray_NAME``; a
counter as ``ray_NAME_total``; a histogram as ``ray_NAME_bucket``, ``_sum`` and ``_count``.
The names are constants here so that tests, the Grafana dashboard check and the alert-rule
check import them rather than spell them again.

Label values are bounded: ``model`` is a catalog id (anything else becomes ``unknown``, as a
client may send any string), ``reason`` an error code, ``status`` the HTTP status the API's
error table gives it (:func:`cluster.api.errors.status_of`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, runtime_checkable

from cluster.api.errors import status_of
from cluster.config.catalog import ModelSpec
from cluster.errors import ClusterError
from cluster.serving.observer import RequestRecord

log = logging.getLogger(__name__)
P = ParamSpec("P")

# --- names as registered with Ray (Prometheus adds the prefix and suffixes below)

RAY_PREFIX = "ray_"
REQUESTS = "llm_ingress_requests"  # counter: model, status, outcome, stream
TTFT = "llm_ingress_time_to_first_token_seconds"  # histogram: model, stream
ITL = "llm_ingress_inter_token_latency_seconds"  # histogram: model (streams only)
E2E = "llm_ingress_e2e_latency_seconds"  # histogram: model, stream (finished requests)
PROMPT_TOKENS = "llm_ingress_prompt_tokens"  # counter: model
COMPLETION_TOKENS = "llm_ingress_completion_tokens"  # counter: model
ESTIMATED_COST = "llm_ingress_estimated_cost_usd"  # counter: model
REJECTIONS = "llm_ingress_rejections"  # counter: model, reason
ONGOING = "llm_ingress_ongoing_requests"  # gauge: model
MAX_REPLICAS = "llm_ingress_model_max_replicas"  # gauge: model, deployment (from the catalog)
REDIS_DOWN = "llm_ingress_redis_down"  # gauge: 1 while the gate finds Redis unreachable
REDIS_ERRORS = "llm_ingress_redis_errors"  # counter: failed Redis calls of the gate
GATE_EVENTS = "llm_ingress_gate_events"  # counter: event (outages, fallback admissions, ...)

# The abuse monitor's (cluster/api/abuse_metrics.py): set by the replica that evaluates.
ABUSE_FLAGGED = "cluster_abuse_flagged_users"  # gauge: key_id, rule (users flagged now)
ABUSE_LIVE = "cluster_abuse_live_actions"  # gauge: action (throttle, block)
ABUSE_ACTIONS = "cluster_abuse_actions"  # counter: action (flagged, throttled, blocked, expired)
ABUSE_LEADER = "cluster_abuse_evaluator_leader"  # gauge: 1 on the evaluating replica

COUNTERS = (REQUESTS, PROMPT_TOKENS, COMPLETION_TOKENS, ESTIMATED_COST, REJECTIONS,
            REDIS_ERRORS, GATE_EVENTS)
HISTOGRAMS = (TTFT, ITL, E2E)
GAUGES = (ONGOING, MAX_REPLICAS, REDIS_DOWN)
ABUSE_COUNTERS = (ABUSE_ACTIONS,)
ABUSE_GAUGES = (ABUSE_FLAGGED, ABUSE_LIVE, ABUSE_LEADER)

# Serve adds these to every metric recorded in a replica (the ingress's own, not a model's).
SERVE_TAGS = ("deployment", "replica", "application")

# Buckets (seconds) for LLM latencies: first token from 10 ms (a warm small model) to 60 s
# (a long prompt queued behind a full batch); per-token gaps from 1 ms to 2 s.
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5,
                2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
               0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0]
E2E_BUCKETS = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
               45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0]

UNKNOWN_MODEL = "unknown"

def prometheus_names() -> set[str]:
    """Every series name the ingress metrics appear under on Ray's Prometheus endpoint."""
    names = {f"{RAY_PREFIX}{c}_total" for c in COUNTERS}
    names |= {f"{RAY_PREFIX}{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
    names |= {f"{RAY_PREFIX}{c}_total" for c in ABUSE_COUNTERS}
    return names | {f"{RAY_PREFIX}{g}" for g in (*GAUGES, *ABUSE_GAUGES)}


def inter_token_latency(record: RequestRecord) -> float | None:
    """Mean gap between tokens after the first, for a stream with two tokens or more."""
    if not record.stream or record.ttft_s is None or record.completion_tokens < 2:
        return None
    return max(0.0, record.e2e_s - record.ttft_s) / (record.completion_tokens - 1)


# --- Ray instruments: one set per process, built on first use


class CounterLike(Protocol):
    def inc(self, value: int | float, tags: dict[str, str]) -> None: ...


class HistogramLike(Protocol):
    def observe(self, value: int | float, tags: dict[str, str]) -> None: ...


class GaugeLike(Protocol):
    def set(self, value: int | float, tags: dict[str, str]) -> None: ...


@dataclass(frozen=True)
class Instruments:
    requests: CounterLike
    ttft: HistogramLike
    itl: HistogramLike
    e2e: HistogramLike
    prompt_tokens: CounterLike
    completion_tokens: CounterLike
    estimated_cost: CounterLike
    rejections: CounterLike
    ongoing: GaugeLike
    max_replicas: GaugeLike
    redis_down: GaugeLike
    redis_errors: CounterLike
    gate_events: CounterLike


def _keys(*names: str) -> Any:
    """Tag keys: Ray annotates them ``Tuple[str]`` but takes a tuple of any length."""
    return names


def _build_instruments() -> Instruments:
    # ray.serve.metrics adds deployment/replica/application tags inside a replica. The
    # max-replicas gauge uses ray.util.metrics: its ``deployment`` tag is the model's
    # deployment (for joins with ray_serve_autoscaling_target_replicas), which Serve's own
    # metric classes reserve.
    from ray.serve.metrics import Counter, Gauge, Histogram
    from ray.util import metrics as ray_metrics

    return Instruments(
        requests=Counter(REQUESTS, "Chat completion requests by model, HTTP status, outcome "
                         "(ok, error, disconnected, rejected) and stream.",
                         tag_keys=_keys("model", "status", "outcome", "stream")),
        ttft=Histogram(TTFT, "Time from request to the first content byte, seconds.",
                       boundaries=TTFT_BUCKETS, tag_keys=_keys("model", "stream")),
        itl=Histogram(ITL, "Mean time between tokens after the first, per streamed request, "
                      "seconds.", boundaries=ITL_BUCKETS, tag_keys=_keys("model")),
        e2e=Histogram(E2E, "Request duration of requests that finished normally, seconds.",
                      boundaries=E2E_BUCKETS, tag_keys=_keys("model", "stream")),
        prompt_tokens=Counter(PROMPT_TOKENS, "Prompt tokens billed.", tag_keys=_keys("model")),
        completion_tokens=Counter(COMPLETION_TOKENS, "Completion tokens billed.",
                                  tag_keys=_keys("model")),
        estimated_cost=Counter(ESTIMATED_COST, "Estimated cost billed, USD.",
                               tag_keys=_keys("model")),
        rejections=Counter(REJECTIONS, "Requests refused before reaching a model, by reason.",
                           tag_keys=_keys("model", "reason")),
        ongoing=Gauge(ONGOING, "Requests admitted and not yet settled, per ingress replica.",
                      tag_keys=_keys("model")),
        max_replicas=ray_metrics.Gauge(MAX_REPLICAS, "The catalog's max_replicas of a model's "
                                       "deployment.", tag_keys=_keys("model", "deployment")),
        redis_down=Gauge(REDIS_DOWN, "1 while the limits store (Redis) is unreachable from "
                         "this ingress replica."),
        redis_errors=Counter(REDIS_ERRORS, "Failed calls to the limits store (Redis)."),
        gate_events=Counter(GATE_EVENTS, "Gate events: Redis outages, admissions by the "
                            "in-memory fallback, 503s while Redis was down, failed "
                            "settlements.", tag_keys=_keys("event")),
    )


_instruments: Instruments | None = None


def ray_instruments() -> Instruments:
    """The process's instruments: Ray metrics are registered once, not per request."""
    global _instruments
    if _instruments is None:
        _instruments = _build_instruments()
    return _instruments


# --- the exporter


class GateStatsLike(Protocol):
    def as_dict(self) -> dict[str, int]: ...


@runtime_checkable
class GateHealth(Protocol):
    """What :class:`cluster.gate.redis_gate.RedisGate` exposes about Redis (``OpenGate``
    has none)."""

    @property
    def redis_down(self) -> bool: ...

    @property
    def stats(self) -> GateStatsLike: ...


def _never_raises(method: Callable[P, None]) -> Callable[P, None]:
    """Metrics must not fail a request (the service records after it has settled)."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            log.exception("recording ingress metrics failed (%s)", method.__name__)

    return guarded


def _flag(value: bool) -> str:
    return "true" if value else "false"


class RayIngressMetrics:
    """:class:`IngressMetrics` through Ray's metrics. ``specs`` bound the ``model`` label and
    give each model's max replicas; ``gate``, when it reports on Redis, drives the Redis
    metrics.

    Ray drops a gauge series that was not written for two export intervals (~20 s), so a
    daemon thread rewrites every gauge each ``refresh_s``: an idle model still shows 0
    ongoing requests, and the catalog's max replicas never disappear. The same thread
    mirrors the gate's Redis state, keeping the request path free of it.
    """

    def __init__(self, specs: Iterable[ModelSpec] = (), gate: object = None,
                 instruments: Instruments | None = None, refresh_s: float | None = 5.0) -> None:
        self.m = instruments or ray_instruments()
        specs = list(specs)
        self.models = frozenset(s.id for s in specs)
        self.max_replicas = {(s.id, s.deployment_name): s.autoscaling.max_replicas
                             for s in specs}
        self.health = gate if isinstance(gate, GateHealth) else None
        self._ongoing = dict.fromkeys(self.models, 0)
        self._lock = threading.Lock()  # ongoing counts: request path vs refresher
        self._exported: dict[str, int] = {}  # gate counters already added to Ray's
        self.refresh()
        if refresh_s:
            threading.Thread(target=self._refresh_every, args=(refresh_s,), daemon=True,
                             name="ingress-metrics-refresh").start()

    def model(self, model: str) -> str:
        return model if not self.models or model in self.models else UNKNOWN_MODEL

    @_never_raises
    def ongoing(self, model: str, delta: int) -> None:
        model = self.model(model)
        with self._lock:
            count = max(0, self._ongoing.get(model, 0) + delta)
            self._ongoing[model] = count
            self.m.ongoing.set(count, {"model": model})

    @_never_raises
    def finished(self, record: RequestRecord) -> None:
        model, stream = self.model(record.model), _flag(record.stream)
        status = 200 if record.error is None else status_of(record.error)
        self.m.requests.inc(1, {"model": model, "status": str(status),
                                "outcome": record.outcome, "stream": stream})
        timing = {"model": model, "stream": stream}
        if record.ttft_s is not None:  # the client got a first byte: a real TTFT
            self.m.ttft.observe(record.ttft_s, timing)
        if record.outcome == "ok":  # failures and hang-ups would distort the latencies
            self.m.e2e.observe(record.e2e_s, timing)
            itl = inter_token_latency(record)
            if itl is not None:
                self.m.itl.observe(itl, {"model": model})
        self._billed(model, record)

    @_never_raises
    def rejected(self, model: str, error: ClusterError) -> None:
        model, status = self.model(model), status_of(error)
        self.m.rejections.inc(1, {"model": model, "reason": error.code})
        # Also a request by status, so request rate and 5xx/429 shares cover refusals.
        self.m.requests.inc(1, {"model": model, "status": str(status),
                                "outcome": "rejected", "stream": ""})

    def _billed(self, model: str, record: RequestRecord) -> None:
        tags = {"model": model}
        # Ray counters refuse increments <= 0.
        if record.prompt_tokens > 0:
            self.m.prompt_tokens.inc(record.prompt_tokens, tags)
        if record.completion_tokens > 0:
            self.m.completion_tokens.inc(record.completion_tokens, tags)
        if record.estimated_cost > 0:
            self.m.estimated_cost.inc(record.estimated_cost, tags)

    def refresh(self) -> None:
        """Rewrite every gauge and mirror the gate's Redis state."""
        for (model, deployment), n in self.max_replicas.items():
            self.m.max_replicas.set(n, {"model": model, "deployment": deployment})
        with self._lock:
            for model, count in self._ongoing.items():
                self.m.ongoing.set(count, {"model": model})
        if self.health is None:
            return
        self.m.redis_down.set(int(self.health.redis_down), {})
        for name, total in self.health.stats.as_dict().items():
            new = total - self._exported.get(name, 0)
            if new <= 0:
                continue
            if name == "redis_errors":
                self.m.redis_errors.inc(new, {})
            else:
                self.m.gate_events.inc(new, {"event": name})
            self._exported[name] = total

    def _refresh_every(self, period_s: float) -> None:
        while True:
            time.sleep(period_s)
            try:
                self.refresh()
            except Exception:  # a metrics hiccup must not end the refresher
                log.exception("refreshing the ingress gauges failed")
