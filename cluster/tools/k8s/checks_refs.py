"""Semantic checks across objects: Secrets and ConfigMaps that pods read exist with those keys,
selectors match pods of the render, and PodMonitors scrape ports those pods name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cluster.tools.k8s.manifests import Template, _d, _l, _objects, _ref, pod_templates
from cluster.tools.k8s.problems import Problem


def _keys(obj: dict[str, Any]) -> set[str]:
    return {k for field in ("data", "stringData", "binaryData") for k in _d(obj.get(field))}


def reference_problems(docs: list[dict[str, Any]], source: str) -> list[Problem]:
    """Secrets and ConfigMaps that pod templates use exist in the render, with those keys."""
    stores = {"Secret": _objects(docs, "Secret"), "ConfigMap": _objects(docs, "ConfigMap")}
    problems = []
    for doc in docs:
        ns = str(_d(doc.get("metadata")).get("namespace", ""))
        for tpl in pod_templates(doc):
            for kind, name, key, optional in _template_refs(tpl):
                if optional:
                    continue
                obj = stores[kind].get((ns, str(name)))
                if obj is None:
                    problems.append(Problem(source, _ref(doc), "reference",
                                            f"{tpl.where}: {kind} {name!r} is not in the "
                                            f"rendered manifests"))
                elif key is not None and key not in _keys(obj):
                    problems.append(Problem(source, _ref(doc), "reference",
                                            f"{tpl.where}: {kind} {name!r} has no key {key!r}"))
    return problems


def _template_refs(tpl: Template) -> Iterator[tuple[str, Any, str | None, bool]]:
    """(kind, name, key or None, optional) for every Secret/ConfigMap a template reads."""
    for c in tpl.containers():
        for var in map(_d, _l(c.get("env"))):
            source = _d(var.get("valueFrom"))
            for field_name, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                ref = _d(source.get(field_name))
                if ref:
                    yield kind, ref.get("name"), ref.get("key"), bool(ref.get("optional"))
        for src in map(_d, _l(c.get("envFrom"))):
            for field_name, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                ref = _d(src.get(field_name))
                if ref:
                    yield kind, ref.get("name"), None, bool(ref.get("optional"))
    for vol in map(_d, _l(tpl.spec.get("volumes"))):
        if "secret" in vol:
            ref = _d(vol["secret"])
            yield "Secret", ref.get("secretName"), None, bool(ref.get("optional"))
        if "configMap" in vol:
            ref = _d(vol["configMap"])
            yield "ConfigMap", ref.get("name"), None, bool(ref.get("optional"))


def _matching(templates: list[Template], ns: str, labels: dict[str, Any]) -> list[Template]:
    return [t for t in templates
            if str(_d(t.owner.get("metadata")).get("namespace", "")) == ns
            and all(t.labels.get(k) == v for k, v in labels.items())]


def selector_problems(docs: list[dict[str, Any]], source: str) -> list[Problem]:
    """Services, NetworkPolicies and PodMonitors select pods this render creates (by their
    template labels), and PodMonitors scrape ports those pods name."""
    templates = [t for d in docs for t in pod_templates(d)]
    problems = []
    for doc in docs:
        ns = str(_d(doc.get("metadata")).get("namespace", ""))
        spec = _d(doc.get("spec"))
        selectors: list[tuple[str, dict[str, Any]]] = []
        if doc.get("kind") == "Service" and spec.get("selector"):
            selectors.append(("spec.selector", _d(spec.get("selector"))))
        elif doc.get("kind") == "NetworkPolicy":
            selectors.append(("spec.podSelector", _d(_d(spec.get("podSelector"))
                                                     .get("matchLabels"))))
            for i, rule in enumerate(map(_d, _l(spec.get("ingress")))):
                for peer in map(_d, _l(rule.get("from"))):
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        selectors.append((f"spec.ingress[{i}].from.podSelector",
                                          _d(_d(peer["podSelector"]).get("matchLabels"))))
        elif doc.get("kind") == "PodMonitor":
            labels = _d(_d(spec.get("selector")).get("matchLabels"))
            selectors.append(("spec.selector", labels))
            problems += _port_problems(doc, source, _matching(templates, ns, labels))
        for where, labels in selectors:
            if labels and not _matching(templates, ns, labels):
                problems.append(Problem(source, _ref(doc), "selector",
                                        f"{where} {labels} matches no pod template"))
    return problems


def _port_problems(doc: dict[str, Any], source: str, pods: list[Template]) -> list[Problem]:
    named = {str(p.get("name")) for t in pods for c in t.containers(init=False)
             for p in map(_d, _l(c.get("ports")))}
    return [Problem(source, _ref(doc), "selector",
                    f"podMetricsEndpoints port {ep.get('port')!r} is not a named port of the "
                    f"selected pods ({', '.join(sorted(named)) or 'none'})")
            for ep in map(_d, _l(_d(doc.get("spec")).get("podMetricsEndpoints")))
            if pods and ep.get("port") is not None and str(ep.get("port")) not in named]
