"""RayIngressMetrics: what it records for each request, through recording instruments."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from cluster.api import metrics as m
from cluster.api.metrics import Instruments, RayIngressMetrics
from cluster.config.catalog import ModelSpec
from cluster.errors import EngineFailed, ModelNotFound, RateLimited, StoreUnavailable
from cluster.gate.redis_gate import GateStats
from cluster.serving.observer import RequestRecord

Tags = tuple[tuple[str, str], ...]


@dataclass
class Recorder:
    """One instrument: counters add, histograms list observations, gauges keep the last."""

    values: dict[Tags, float] = field(default_factory=lambda: defaultdict(float))
    observed: dict[Tags, list[float]] = field(default_factory=lambda: defaultdict(list))

    @staticmethod
    def key(tags: dict[str, str]) -> Tags:
        return tuple(sorted(tags.items()))

    def inc(self, value: int | float, tags: dict[str, str]) -> None:
        assert value > 0, "Ray counters refuse increments <= 0"
        self.values[self.key(tags)] += value

    def observe(self, value: int | float, tags: dict[str, str]) -> None:
        self.observed[self.key(tags)].append(value)

    def set(self, value: int | float, tags: dict[str, str]) -> None:
        self.values[self.key(tags)] = value

    def get(self, **tags: str) -> float:
        return self.values.get(self.key(tags), 0)

    def seen(self, **tags: str) -> list[float]:
        return self.observed.get(self.key(tags), [])


def recorders() -> Instruments:
    return Instruments(**{f: Recorder() for f in Instruments.__dataclass_fields__})


def spec(model_id: str, max_replicas: int = 3) -> ModelSpec:
    return ModelSpec.model_validate({
        "id": model_id, "profile": "local", "source": {"path": "/models/x"},
        "engine": {"max_model_len": 1024},
        "autoscaling": {"min_replicas": 1, "max_replicas": max_replicas},
        "pricing": {"input_per_million": 1.0, "output_per_million": 2.0}})


class FakeGate:
    def __init__(self) -> None:
        self.redis_down = False
        self.stats = GateStats()


def record(**over: object) -> RequestRecord:
    base: dict[str, object] = dict(model="org/a", error=None, outcome="ok", stream=True,
                                   e2e_s=1.0, ttft_s=0.1, prompt_tokens=10,
                                   completion_tokens=10, estimated_cost=0.002)
    return RequestRecord(**(base | over))  # type: ignore[arg-type]


def metrics(gate: object = None) -> tuple[RayIngressMetrics, Instruments]:
    inst = recorders()
    return RayIngressMetrics([spec("org/a"), spec("org/b", 5)], gate, inst, refresh_s=None), inst


def rec(inst: Instruments, name: str) -> Recorder:
    got = getattr(inst, name)
    assert isinstance(got, Recorder)
    return got


def test_a_streamed_request_records_everything() -> None:
    mx, inst = metrics()
    mx.finished(record())
    assert rec(inst, "requests").get(model="org/a", status="200", outcome="ok",
                                     stream="true") == 1
    assert rec(inst, "ttft").seen(model="org/a", stream="true") == [0.1]
    assert rec(inst, "e2e").seen(model="org/a", stream="true") == [1.0]
    assert rec(inst, "itl").seen(model="org/a") == [pytest.approx(0.1)]  # 0.9 s / 9 gaps
    assert rec(inst, "prompt_tokens").get(model="org/a") == 10
    assert rec(inst, "completion_tokens").get(model="org/a") == 10
    assert rec(inst, "estimated_cost").get(model="org/a") == pytest.approx(0.002)


@pytest.mark.parametrize("over", [{"stream": False}, {"completion_tokens": 1},
                                  {"ttft_s": None}])
def test_no_inter_token_latency_without_a_stream_of_two_tokens(over: dict[str, object]) -> None:
    assert m.inter_token_latency(record(**over)) is None


def test_failed_requests_count_but_leave_latencies_alone() -> None:
    mx, inst = metrics()
    mx.finished(record(outcome="error", error=EngineFailed("boom"), ttft_s=None,
                       completion_tokens=0, estimated_cost=0.0))
    assert rec(inst, "requests").get(model="org/a", status="500", outcome="error",
                                     stream="true") == 1
    assert not rec(inst, "e2e").observed and not rec(inst, "itl").observed
    assert not rec(inst, "ttft").observed
    assert rec(inst, "completion_tokens").get(model="org/a") == 0  # no zero increment
    assert rec(inst, "prompt_tokens").get(model="org/a") == 10  # still billed


def test_rejections_count_by_reason_and_as_requests_with_their_status() -> None:
    mx, inst = metrics()
    mx.rejected("org/b", RateLimited("slow down"))
    mx.rejected("org/b", StoreUnavailable())
    assert rec(inst, "rejections").get(model="org/b", reason="rate_limit_exceeded") == 1
    requests = rec(inst, "requests")
    assert requests.get(model="org/b", status="429", outcome="rejected", stream="") == 1
    assert requests.get(model="org/b", status="503", outcome="rejected", stream="") == 1


def test_a_made_up_model_name_is_not_a_label_value() -> None:
    mx, inst = metrics()
    mx.rejected("../../etc/passwd", ModelNotFound("x"))
    assert rec(inst, "rejections").get(model=m.UNKNOWN_MODEL, reason="model_not_found") == 1
    assert rec(inst, "requests").get(model=m.UNKNOWN_MODEL, status="404",
                                     outcome="rejected", stream="") == 1


def test_ongoing_counts_per_model_and_never_goes_negative() -> None:
    mx, inst = metrics()
    ongoing = rec(inst, "ongoing")
    assert ongoing.get(model="org/a") == 0 and ongoing.get(model="org/b") == 0  # from start
    mx.ongoing("org/a", 1)
    mx.ongoing("org/a", 1)
    mx.ongoing("org/b", 1)
    mx.ongoing("org/a", -1)
    assert ongoing.get(model="org/a") == 1 and ongoing.get(model="org/b") == 1
    mx.ongoing("org/b", -1)
    mx.ongoing("org/b", -1)
    assert ongoing.get(model="org/b") == 0


def test_refresh_rewrites_gauges_and_mirrors_redis() -> None:
    gate = FakeGate()
    mx, inst = metrics(gate)
    max_replicas = rec(inst, "max_replicas")
    assert max_replicas.get(model="org/b", deployment="model-org-b") == 5
    assert rec(inst, "redis_down").get() == 0
    gate.redis_down, gate.stats.redis_errors = True, 3
    mx.refresh()
    assert rec(inst, "redis_down").get() == 1 and rec(inst, "redis_errors").get() == 3
    gate.redis_down, gate.stats.redis_errors = False, 4
    mx.refresh()
    mx.refresh()
    assert rec(inst, "redis_down").get() == 0 and rec(inst, "redis_errors").get() == 4


def test_a_gate_without_redis_state_gets_no_redis_metrics() -> None:
    from cluster.gate.contract import OpenGate

    mx, inst = metrics(OpenGate())
    mx.refresh()
    assert not rec(inst, "redis_down").values


def test_prometheus_names_follow_rays_export_naming() -> None:
    names = m.prometheus_names()
    assert "ray_llm_ingress_requests_total" in names
    assert "ray_llm_ingress_time_to_first_token_seconds_bucket" in names
    assert "ray_llm_ingress_ongoing_requests" in names
    assert "ray_llm_ingress_ongoing_requests_total" not in names
    assert len(names) == len(m.COUNTERS) + 3 * len(m.HISTOGRAMS) + len(m.GAUGES) + \
        len(m.ABUSE_COUNTERS) + len(m.ABUSE_GAUGES)


def test_buckets_cover_llm_latencies() -> None:
    assert m.TTFT_BUCKETS[0] == 0.01 and m.TTFT_BUCKETS[-1] == 60.0
    for buckets in (m.TTFT_BUCKETS, m.ITL_BUCKETS, m.E2E_BUCKETS):
        assert buckets == sorted(set(buckets))


def test_the_real_instruments_are_built_once_per_process() -> None:
    assert m.ray_instruments() is m.ray_instruments()


def test_a_failing_instrument_never_fails_the_request(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        def inc(self, value: int | float, tags: dict[str, str]) -> None:
            raise RuntimeError("metrics backend down")

    inst = recorders()
    object.__setattr__(inst, "requests", Broken())
    mx = RayIngressMetrics([spec("org/a")], None, inst, refresh_s=None)
    mx.finished(record())
    mx.rejected("org/a", RateLimited("slow down"))
    assert "recording ingress metrics failed" in caplog.text
    assert rec(inst, "rejections").get(model="org/a", reason="rate_limit_exceeded") == 1
