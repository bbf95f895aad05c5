"""The monitoring files in ops/: alert rules pass promtool, and every metric that the Grafana
dashboard and the rules query is one the stack exports.

promtool comes from Debian's ``prometheus`` package (``ops/dev.sh test`` installs it). Without
it these tests skip on a workstation and fail in CI (env ``CI`` set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.api import metrics as m

OPS = Path(__file__).resolve().parents[1] / "ops"
RULES = OPS / "alerts" / "cluster-rules.yaml"
RULE_TESTS = OPS / "alerts" / "cluster-rules.test.yaml"
DASHBOARD = OPS / "grafana" / "cluster-dashboard.json"
RUNBOOK = OPS / "RUNBOOK.md"

# Ray Serve 2.60 metrics the dashboard and rules use, with the labels they are queried by,
# as seen on a local stack's metrics port (tests/integration/test_metrics.py checks this list
# against a real scrape). Ray adds Component, NodeAddress, SessionName, Version, WorkerId.
SERVE_METRICS: dict[str, set[str]] = {
    "ray_serve_autoscaling_target_replicas": {"application", "deployment"},
    "ray_serve_deployment_replica_healthy": {"application", "deployment", "replica"},
    "ray_serve_replica_startup_latency_ms_count": {"application", "deployment"},
    "ray_serve_deployment_queued_queries": {"application", "deployment", "handle"},
    "ray_serve_num_ongoing_requests_at_replicas": {"application", "deployment", "handle"},
    "ray_serve_http_request_latency_ms_bucket": {"application", "route", "status_code", "le"},
    "ray_serve_num_http_requests_total": {"application", "route", "method", "status_code"},
}

# The labels of the ingress's metrics: their tag keys plus what Serve adds in a replica.
_INGRESS_LABELS = {
    m.REQUESTS: {"model", "status", "outcome", "stream"},
    m.TTFT: {"model", "stream", "le"},
    m.ITL: {"model", "le"},
    m.E2E: {"model", "stream", "le"},
    m.PROMPT_TOKENS: {"model"},
    m.COMPLETION_TOKENS: {"model"},
    m.ESTIMATED_COST: {"model"},
    m.REJECTIONS: {"model", "reason"},
    m.ONGOING: {"model"},
    m.REDIS_DOWN: set(),
    m.REDIS_ERRORS: set(),
    m.GATE_EVENTS: {"event"},
    m.ABUSE_FLAGGED: {"key_id", "rule"},
    m.ABUSE_LIVE: {"action"},
    m.ABUSE_ACTIONS: {"action"},
    m.ABUSE_LEADER: set(),
}


def ingress_labels() -> dict[str, set[str]]:
    out = {}
    for name in m.prometheus_names():
        base = next(b for b in (*m.COUNTERS, *m.HISTOGRAMS, *m.GAUGES, *m.ABUSE_COUNTERS,
                                *m.ABUSE_GAUGES) if name.startswith(m.RAY_PREFIX + b))
        if base == m.MAX_REPLICAS:  # ray.util.metrics: no Serve tags, its own deployment
            out[name] = {"model", "deployment"}
        else:
            out[name] = _INGRESS_LABELS[base] | set(m.SERVE_TAGS)
    return out


EXPORTED = ingress_labels() | SERVE_METRICS

METRIC = re.compile(r"\bray_[a-zA-Z0-9_:]+")
SELECTOR = re.compile(r"\b(ray_[a-zA-Z0-9_:]+)\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is missing: apt-get install -y prometheus"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, so PromQL tools parse it."""
    return (expr.replace("$__rate_interval", "5m").replace("$model", ".*")
            .replace("$deployment", ".*"))


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# --- promtool


def test_rules_pass_promtool_check() -> None:
    done = run_promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_rules_pass_their_promtool_unit_tests() -> None:
    done = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_unit_tests_cover_the_required_alerts_firing() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fired = {case["alertname"] for t in doc["tests"] for case in t["alert_rule_test"]
             if case.get("exp_alerts")}
    assert fired == {r["alert"] for r in rules()}


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query, as a recording rule."""
    recorded = [{"record": f"dashboard:query_{i}", "expr": concrete(expr)}
                for i, (_, expr) in enumerate(dashboard_targets())]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    done = run_promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# --- metric names and labels


def queried(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def unknown_labels(expr: str) -> list[str]:
    bad = []
    for name, matchers in SELECTOR.findall(expr):
        for label in MATCHER.findall(matchers):
            if name in EXPORTED and label not in EXPORTED[name]:
                bad.append(f"{name}{{{label}}}")
    return bad


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_queried_metric_is_exported(source: str) -> None:
    exprs = ([r["expr"] for r in rules()] if source == "rules"
             else [e for _, e in dashboard_targets()])
    assert exprs
    for expr in exprs:
        names = queried(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= set(EXPORTED), f"not exported: {names - set(EXPORTED)} in {expr!r}"
        assert not unknown_labels(expr), f"unknown labels {unknown_labels(expr)} in {expr!r}"


def test_the_checks_catch_a_misspelt_metric_or_label() -> None:
    assert queried("rate(ray_llm_ingress_request_total[5m])") - set(EXPORTED)
    assert unknown_labels('sum(ray_llm_ingress_requests_total{modle="x"})')
    assert not unknown_labels('sum(ray_llm_ingress_requests_total{model=~"$model"})')


def test_the_ingress_metrics_all_appear_on_the_dashboard() -> None:
    on_dashboard = set().union(*(queried(e) for _, e in dashboard_targets()))
    wanted = {f"{m.RAY_PREFIX}{c}_total" for c in m.COUNTERS if c != m.REDIS_ERRORS}
    wanted |= {f"{m.RAY_PREFIX}{h}_bucket" for h in m.HISTOGRAMS}
    wanted |= {f"{m.RAY_PREFIX}{g}" for g in m.GAUGES}
    assert wanted <= on_dashboard, wanted - on_dashboard


# --- the dashboard


def test_dashboard_has_model_and_datasource_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["includeAll"] and model["multi"]
    assert queried(model["query"]["query"]) <= set(EXPORTED)
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    ingress_queries = [e for _, e in dashboard_targets() if "ray_llm_ingress_" in e
                       and "max_replicas" not in e and "redis_down" not in e
                       and "gate_events" not in e]  # no model label: gate-wide
    assert all('model=~"$model"' in e for e in ingress_queries)


def test_dashboard_panels_cover_the_issue() -> None:
    titles = " | ".join(p["title"] for p in dashboard()["panels"]).lower()
    for words in ("request rate by model and status", "error rate", "time to first token",
                  "inter-token latency", "end-to-end latency", "tokens/s in and out",
                  "cost per hour", "rejections by reason", "ongoing requests",
                  "replicas per deployment", "queued and ongoing requests at handles",
                  "replica starts", "proxy request latency"):
        assert words in titles, words
    text = DASHBOARD.read_text()
    for quantile in ("histogram_quantile(0.5,", "histogram_quantile(0.99,"):
        assert text.count(quantile) >= 4


def test_dashboard_panel_ids_and_positions_are_unique() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


# --- alerts and runbook


def test_every_alert_has_summary_description_and_a_runbook_anchor() -> None:
    anchors = {slug(line.lstrip("#")) for line in RUNBOOK.read_text().splitlines()
               if line.startswith("#")}
    for rule in rules():
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        url, _, anchor = notes["runbook_url"].partition("#")
        assert url.endswith("/ops/RUNBOOK.md"), rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_the_issue_alerts_are_all_there() -> None:
    names = {r["alert"] for r in rules()}
    assert {"LLMTimeToFirstTokenHigh", "LLMErrorRateHigh", "LLMRateLimitStorm",
            "LLMModelAtMaxReplicas", "LLMRedisDown", "LLMReplicaRestarts"} <= names


def test_rules_file_is_a_prometheusrule_spec() -> None:
    """The same ``groups:`` list works as ``spec`` of a Prometheus Operator PrometheusRule."""
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit", "partial_response_strategy"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations",
                                 "keep_firing_for"}


def test_runbook_links_land_on_headings() -> None:
    """Links to a section of the runbook or of k8s/README.md name a heading that exists."""
    def anchors(path: Path) -> set[str]:
        return {slug(line.lstrip("#")) for line in path.read_text().splitlines()
                if line.startswith("#")}

    text = RUNBOOK.read_text()
    links = re.findall(r"\]\(([^)#]*)#([^)]+)\)", text)
    assert links
    for target, anchor in links:
        path = RUNBOOK if not target else (RUNBOOK.parent / target).resolve()
        assert path.exists(), target
        assert anchor in anchors(path), f"{target}#{anchor}"
