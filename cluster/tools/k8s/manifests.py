"""Reading rendered objects that may be malformed (the schema check reports that, the semantic
checks must not crash on it), and finding the pod templates in them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
RAY_KINDS = {"RayService", "RayCluster"}


def _d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _l(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float:
    """A number from a field that may be malformed (the schema check reports that)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _ref(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind', '?')}/{_d(doc.get('metadata')).get('name', '?')}"


def _path(parts: Iterable[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _objects(docs: list[dict[str, Any]], kind: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The objects of one kind by (namespace, name)."""
    return {(str(meta.get("namespace", "")), str(meta.get("name"))): d
            for d in docs if d.get("kind") == kind for meta in [_d(d.get("metadata"))]}


@dataclass(frozen=True)
class Template:
    owner: dict[str, Any]  # the object holding the template
    where: str  # e.g. "workerGroupSpecs[h100x2]"
    template: dict[str, Any]

    @property
    def labels(self) -> dict[str, str]:
        return _d(_d(self.template.get("metadata")).get("labels"))

    @property
    def spec(self) -> dict[str, Any]:
        return _d(self.template.get("spec"))

    def containers(self, init: bool = True) -> list[dict[str, Any]]:
        found = _l(self.spec.get("containers")) + (_l(self.spec.get("initContainers")) if init
                                                    else [])
        return [c for c in found if isinstance(c, dict)]


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = _d(doc.get("spec"))
    return _d(spec.get("rayClusterConfig")) if doc.get("kind") == "RayService" else spec


def pod_templates(doc: dict[str, Any]) -> Iterator[Template]:
    kind, spec = doc.get("kind"), _d(doc.get("spec"))
    if kind in RAY_KINDS:
        cluster = ray_cluster_spec(doc)
        yield Template(doc, "headGroupSpec", _d(_d(cluster.get("headGroupSpec")).get("template")))
        for group in map(_d, _l(cluster.get("workerGroupSpecs"))):
            yield Template(doc, f"workerGroupSpecs[{group.get('groupName')}]",
                           _d(group.get("template")))
    elif kind in WORKLOAD_KINDS:
        yield Template(doc, "template", _d(spec.get("template")))
    elif kind == "CronJob":
        job = _d(_d(spec.get("jobTemplate")).get("spec"))
        yield Template(doc, "jobTemplate", _d(job.get("template")))
    elif kind == "Pod":
        yield Template(doc, "pod", {"metadata": doc.get("metadata"), "spec": spec})
