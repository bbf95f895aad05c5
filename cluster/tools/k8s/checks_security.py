"""Who may reach the Ray cluster: Ray's token authentication on, and (for an overlay) the
NetworkPolicies that close Ray's own ports to everything but the Ray pods.

A Ray pod may take connections from outside the Ray pods only on the ports in ``OPEN``, and
only from peers a rule names (a namespace or pod selector, never "anyone"): the API, the
metrics for Prometheus, and the dashboard and its agent for the KubeRay operator (which
also needs Ray's token).
"""

from __future__ import annotations

from typing import Any

from cluster.tools.k8s.manifests import (
    RAY_KINDS,
    Template,
    _d,
    _l,
    _objects,
    _ref,
    pod_templates,
    ray_cluster_spec,
)
from cluster.tools.k8s.problems import Problem

SERVE_PORT = 8000
METRICS_PORTS = frozenset({8080, 44217, 44227})
OPERATOR_PORTS = frozenset({8265, 52365})  # dashboard and its agent: KubeRay's way in
OPEN = frozenset({SERVE_PORT} | METRICS_PORTS | OPERATOR_PORTS)
TOKEN_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName


def auth_problems(doc: dict[str, Any], source: str) -> list[Problem]:
    """A Ray cluster has token authentication on."""
    auth = _d(ray_cluster_spec(doc).get("authOptions"))
    if auth.get("mode") == "token":
        return []
    return [Problem(source, _ref(doc), "ray-auth",
                    "rayClusterConfig.authOptions.mode is not 'token': anyone who reaches the "
                    "GCS or the dashboard can run code in the cluster (ShadowRay)")]


def _selects(policy: dict[str, Any], tpl: Template) -> bool:
    meta, owner = _d(policy.get("metadata")), _d(tpl.owner.get("metadata"))
    if meta.get("namespace", "") != owner.get("namespace", ""):
        return False
    labels = _d(_d(_d(policy.get("spec")).get("podSelector")).get("matchLabels"))
    return all(tpl.labels.get(k) == v for k, v in labels.items())


def _is_ray_peer(peer: dict[str, Any], pods: list[Template]) -> bool:
    """A peer that selects only Ray pods of this render (a podSelector of the policy's
    namespace whose every match is a Ray pod template)."""
    if set(peer) != {"podSelector"}:
        return False
    wanted = _d(_d(peer["podSelector"]).get("matchLabels"))
    matched = [t for t in pods if all(t.labels.get(k) == v for k, v in wanted.items())]
    return bool(wanted) and bool(matched) and all(t.owner.get("kind") in RAY_KINDS
                                                  for t in matched)


def _is_ray_rule(rule: dict[str, Any], pods: list[Template]) -> bool:
    peers = [_d(p) for p in _l(rule.get("from"))]
    return bool(peers) and all(_is_ray_peer(p, pods) for p in peers)


def _rule_problems(policy: dict[str, Any], rule: dict[str, Any], i: int,
                   pods: list[Template], source: str) -> list[Problem]:
    where = f"{_ref(policy)} spec.ingress[{i}]"
    if _is_ray_rule(rule, pods):
        return []  # Ray pods among themselves: every port
    peers = [_d(p) for p in _l(rule.get("from"))]
    if not peers or any(not (p.get("namespaceSelector") or p.get("podSelector"))
                        for p in peers):
        return [Problem(source, _ref(policy), "network-policy",
                        f"{where} lets any peer in (no `from`, an empty selector or an "
                        f"ipBlock): name the namespaces or pods")]
    ports = [_d(p).get("port") for p in _l(rule.get("ports"))]
    wide = [p for p in ports if not isinstance(p, int) or p not in OPEN]
    if not ports or wide:
        shown = ", ".join(map(str, wide)) if ports else "every port"
        return [Problem(source, _ref(policy), "network-policy",
                        f"{where} opens {shown} of the Ray pods beyond their own: only the "
                        f"API {SERVE_PORT}, metrics {sorted(METRICS_PORTS)} and, for the "
                        f"operator, the dashboard {sorted(OPERATOR_PORTS)} may be")]
    return []


def policy_problems(docs: list[dict[str, Any]], source: str) -> list[Problem]:
    """For an overlay: every Ray pod is selected by an Ingress NetworkPolicy, the Ray pods
    may reach each other, and no rule opens Ray's own ports to anyone else."""
    pods = [t for d in docs for t in pod_templates(d)]
    ray_templates = [t for t in pods if t.owner.get("kind") in RAY_KINDS]
    if not ray_templates:
        return []
    policies = [p for p in _objects(docs, "NetworkPolicy").values()
                if "Ingress" in _l(_d(p.get("spec")).get("policyTypes"))]
    problems: list[Problem] = []
    for tpl in ray_templates:
        selecting = [p for p in policies if _selects(p, tpl)]
        if not selecting:
            problems.append(Problem(source, _ref(tpl.owner), "network-policy",
                                    f"{tpl.where}: no Ingress NetworkPolicy selects these "
                                    f"pods, so every pod of the cluster reaches the GCS and "
                                    f"the dashboard"))
        elif not any(_is_ray_rule(_d(rule), pods)
                     for p in selecting for rule in _l(_d(p.get("spec")).get("ingress"))):
            problems.append(Problem(source, _ref(tpl.owner), "network-policy",
                                    f"{tpl.where}: no policy lets the other Ray pods in; "
                                    f"the cluster cannot form"))
    for policy in [p for p in policies if any(_selects(p, t) for t in ray_templates)]:
        for i, rule in enumerate(map(_d, _l(_d(policy.get("spec")).get("ingress")))):
            problems += _rule_problems(policy, rule, i, pods, source)
    return problems + _token_secret_problems(docs, source)


def _token_secret_problems(docs: list[dict[str, Any]], source: str) -> list[Problem]:
    """The Secret that authOptions names is in the overlay, with the key KubeRay reads."""
    secrets = _objects(docs, "Secret")
    problems = []
    for doc in docs:
        if doc.get("kind") not in RAY_KINDS:
            continue
        name = _d(ray_cluster_spec(doc).get("authOptions")).get("secretName")
        ns = str(_d(doc.get("metadata")).get("namespace", ""))
        secret = secrets.get((ns, str(name)))
        keys = set(_d(secret.get("data"))) | set(_d(secret.get("stringData"))) if secret else set()
        if name and TOKEN_KEY not in keys:
            problems.append(Problem(source, _ref(doc), "ray-auth",
                                    f"authOptions.secretName {name!r} is not a Secret of this "
                                    f"overlay with the key {TOKEN_KEY!r}"))
    return problems
