"""The semantic checks: what no schema says, over all objects of one render."""

from __future__ import annotations

from typing import Any

from cluster.tools.k8s.checks_ray import ray_problems
from cluster.tools.k8s.checks_refs import reference_problems, selector_problems
from cluster.tools.k8s.checks_security import auth_problems
from cluster.tools.k8s.manifests import RAY_KINDS, Template, _d, _objects, _ref, pod_templates
from cluster.tools.k8s.problems import Problem
from cluster.tools.k8s.resources import GPU_RESOURCE, _container_resources, quantity


def gpu_problems(tpl: Template, source: str) -> list[Problem]:
    """Every GPU request equals its limit (KubeRay reads the count; the scheduler needs both)."""
    problems = []
    for c in tpl.containers():
        req = _container_resources(c, "requests").get(GPU_RESOURCE)
        lim = _container_resources(c, "limits").get(GPU_RESOURCE)
        if (req, lim) != (None, None) and (req is None or lim is None
                                           or quantity(req) != quantity(lim)):
            problems.append(Problem(source, _ref(tpl.owner), "gpu-request-limit",
                                    f"{tpl.where} container {c.get('name')!r}: {GPU_RESOURCE} "
                                    f"request {req} != limit {lim}"))
    return problems


def semantic_problems(docs: list[dict[str, Any]], source: str) -> list[Problem]:
    configmaps = {name: {str(k): str(v) for k, v in _d(d.get("data")).items()}
                  for (_, name), d in _objects(docs, "ConfigMap").items()}
    problems: list[Problem] = []
    for doc in docs:
        for tpl in pod_templates(doc):
            problems += gpu_problems(tpl, source)
        if doc.get("kind") in RAY_KINDS:
            problems += ray_problems(doc, source, configmaps) + auth_problems(doc, source)
    return problems + reference_problems(docs, source) + selector_problems(docs, source)
