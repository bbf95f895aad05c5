"""The ingress metrics on Ray's Prometheus endpoint, and through a real Prometheus server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cluster.api import metrics as m
from cluster.config.serve_options import APP_NAME, INGRESS_NAME
from cluster.tools.redis_server import free_port
from cluster.tools.stack import LocalStack
from tests.integration.conftest import TINY_A

Labels = dict[str, str]
Sample = tuple[str, Labels, float]

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
EXPORT_WAIT_S = 60  # Ray's agents push every ~10 s; several pushes fit in this
PROMETHEUS = shutil.which("prometheus")


def scrape(url: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (enough of the format for Ray's)."""
    samples: list[Sample] = []
    for line in httpx.get(url, timeout=10).text.splitlines():
        found = SAMPLE.match(line)
        if found and not line.startswith("#"):
            labels = dict(LABEL.findall(found.group(2) or ""))
            samples.append((found.group(1), labels, float(found.group(3))))
    return samples


def total(samples: list[Sample], name: str, **want: str) -> float:
    """The sum of a series over every label set that has the wanted labels."""
    return sum(v for n, labels, v in samples
               if n == name and all(labels.get(k) == w for k, w in want.items()))


def values(samples: list[Sample], name: str, **want: str) -> set[float]:
    return {v for n, labels, v in samples
            if n == name and all(labels.get(k) == w for k, w in want.items())}


def series(samples: list[Sample], name: str, **want: str) -> list[Labels]:
    return [labels for n, labels, _ in samples
            if n == name and all(labels.get(k) == w for k, w in want.items())]


def wait_for(probe: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def name(metric: str, kind: str = "") -> str:
    return f"{m.RAY_PREFIX}{metric}{kind}"


REQ = name(m.REQUESTS, "_total")
STREAM_OK = {"model": TINY_A, "status": "200", "outcome": "ok", "stream": "true"}
PLAIN_OK = {"model": TINY_A, "status": "200", "outcome": "ok", "stream": "false"}
NOT_FOUND = {"model": m.UNKNOWN_MODEL, "status": "404", "outcome": "rejected"}


@pytest.fixture(scope="module")
def traffic(stack: LocalStack, sdk: openai.OpenAI) -> tuple[list[Sample], list[Sample]]:
    """Scrapes before and after a plain request, a streamed one and a 404."""
    before = scrape(stack.metrics_url)
    sdk.chat.completions.create(model=TINY_A, max_tokens=6,
                                messages=[{"role": "user", "content": "Hi there"}])
    chunks = list(sdk.chat.completions.create(
        model=TINY_A, max_tokens=8, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count to ten"}]))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 1
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="no-such/model", max_tokens=1,
                                    messages=[{"role": "user", "content": "Hi"}])
    after: list[Sample] = []

    def exported() -> bool:
        nonlocal after
        after = scrape(stack.metrics_url)
        return all(total(after, REQ, **want) > total(before, REQ, **want)
                   for want in (STREAM_OK, PLAIN_OK, NOT_FOUND))

    wait_for(exported, EXPORT_WAIT_S, "the ingress metrics to be exported")
    return before, after


def grew(traffic: tuple[list[Sample], list[Sample]], metric: str, **want: str) -> float:
    before, after = traffic
    return total(after, metric, **want) - total(before, metric, **want)


def test_requests_by_model_status_outcome_and_stream(
        traffic: tuple[list[Sample], list[Sample]]) -> None:
    _, after = traffic
    assert grew(traffic, REQ, **PLAIN_OK) >= 1
    assert grew(traffic, REQ, **STREAM_OK) >= 1
    assert grew(traffic, REQ, **NOT_FOUND) >= 1
    assert grew(traffic, name(m.REJECTIONS, "_total"), model=m.UNKNOWN_MODEL,
                reason="model_not_found") >= 1
    # Serve tags the ingress's own metrics with its deployment and application.
    labels = series(after, REQ, **STREAM_OK)[0]
    assert labels["deployment"] == INGRESS_NAME and labels["application"] == APP_NAME
    assert labels.get("replica")
    # The client's made-up model name never becomes a label value.
    assert not series(after, REQ, model="no-such/model")


def test_latency_histograms(traffic: tuple[list[Sample], list[Sample]]) -> None:
    _, after = traffic
    for metric, want in ((m.TTFT, {"model": TINY_A, "stream": "true"}),
                         (m.TTFT, {"model": TINY_A, "stream": "false"}),
                         (m.E2E, {"model": TINY_A, "stream": "true"}),
                         (m.ITL, {"model": TINY_A})):
        assert grew(traffic, name(metric, "_count"), **want) >= 1, metric
        assert grew(traffic, name(metric, "_sum"), **want) > 0, metric
        inf = [v for n, labels, v in after if n == name(metric, "_bucket")
               and labels.get("le") == "+Inf" and all(labels.get(k) == w
                                                       for k, w in want.items())]
        assert inf and sum(inf) == total(after, name(metric, "_count"), **want)
    # A tiny model streams 8 tokens on the CPU in well under a second per token.
    itl_sum = grew(traffic, name(m.ITL, "_sum"), model=TINY_A)
    assert itl_sum / grew(traffic, name(m.ITL, "_count"), model=TINY_A) < 1.0


def test_tokens_cost_and_gauges(stack: LocalStack,
                                traffic: tuple[list[Sample], list[Sample]]) -> None:
    assert grew(traffic, name(m.PROMPT_TOKENS, "_total"), model=TINY_A) >= 2
    assert grew(traffic, name(m.COMPLETION_TOKENS, "_total"), model=TINY_A) >= 2
    assert grew(traffic, name(m.ESTIMATED_COST, "_total"), model=TINY_A) > 0
    # Gauges are read from later scrapes than the counters: a gauge may reach Ray's
    # endpoint a push (~10 s) after them (CI saw ongoing still 1, and redis_down still 1
    # from the Redis outage test just before). A gauge that stays wrong still fails.
    deadline = time.monotonic() + EXPORT_WAIT_S
    while True:
        latest = scrape(stack.metrics_url)
        ongoing = total(latest, name(m.ONGOING), model=TINY_A)
        redis_down = values(latest, name(m.REDIS_DOWN), deployment=INGRESS_NAME)
        if (ongoing == 0 and redis_down == {0.0}) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert ongoing == 0  # every request settled
    assert redis_down == {0.0}  # every ingress replica is back on Redis
    # One series per ingress replica, each with the catalog's figure, kept alive by the
    # refresher long after the replica set it.
    assert values(latest, name(m.MAX_REPLICAS), model=TINY_A,
                  deployment="model-test-tiny-a") == {1.0}


def test_serve_metrics_the_ops_files_use_are_exported(
        traffic: tuple[list[Sample], list[Sample]]) -> None:
    """The checked-in list of Ray Serve names (tests/test_ops.py) against a real scrape."""
    from tests.test_ops import SERVE_METRICS

    _, after = traffic
    for metric, labels in SERVE_METRICS.items():
        found = [set(lbl) for n, lbl, _ in after if n == metric]
        assert found, f"{metric} is not exported"
        assert any(labels <= f for f in found), f"{metric} has no series with {labels}"
    assert {s["deployment"] for s in series(after, "ray_serve_autoscaling_target_replicas")
            } >= {INGRESS_NAME, "model-test-tiny-a"}


@pytest.fixture
def prometheus(stack: LocalStack, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus server scraping the stack's metrics port every second."""
    if PROMETHEUS is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed (apt-get install -y prometheus)")
        pytest.skip("prometheus is not installed (apt-get install -y prometheus)")
    target = stack.metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [target]}]}]}))
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def query(base: str, promql: str) -> list[dict[str, object]]:
    try:
        reply = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    except httpx.HTTPError:
        return []  # not listening yet
    if reply.status_code != 200:
        return []
    result: list[dict[str, object]] = reply.json()["data"]["result"]
    return result


def test_prometheus_scrapes_the_ingress_metrics(
        traffic: tuple[list[Sample], list[Sample]], prometheus: str) -> None:
    promql = f'sum by (model, status) ({REQ}{{model="{TINY_A}", status="200"}})'
    found: list[dict[str, object]] = []

    def scraped() -> bool:
        nonlocal found
        found = query(prometheus, promql)
        return bool(found)

    wait_for(scraped, 60, "Prometheus to scrape the stack")
    labels, (_, value) = found[0]["metric"], found[0]["value"]  # type: ignore[misc]
    assert labels == {"model": TINY_A, "status": "200"}
    assert float(value) >= 2  # the plain and the streamed request at least
    up = query(prometheus, 'up{job="ray"}')
    assert up and up[0]["value"][1] == "1"  # type: ignore[index]
