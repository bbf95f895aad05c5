"""Kubernetes quantities and Ray resources: what a worker group's pod offers, what a Serve
replica needs."""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from cluster.tools.k8s.manifests import _d, _l, _num

GPU_RESOURCE = "nvidia.com/gpu"

_SUFFIX = {"m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
           "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
           "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30),
           "Ti": Decimal(2**40), "Pi": Decimal(2**50), "Ei": Decimal(2**60)}


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "200Gi", 4) as a number; unparseable is 0."""
    text = str(value).strip()
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE])?", text)
    if not match:
        return 0.0
    try:
        return float(Decimal(match[1]) * _SUFFIX.get(match[2] or "", Decimal(1)))
    except InvalidOperation:
        return 0.0


def _container_resources(container: dict[str, Any], kind: str) -> dict[str, Any]:
    return _d(_d(container.get("resources")).get(kind))


def _ray_resources_param(text: str) -> dict[str, float]:
    """rayStartParams.resources: '"{\\"name\\": 1}"' as KubeRay and Ray's autoscaler read it."""
    try:
        data = json.loads(text.strip().strip("'\"").replace("\\", ""))
    except json.JSONDecodeError:
        return {}
    return {str(k): float(v) for k, v in _d(data).items()}


def group_resources(group: dict[str, Any]) -> dict[str, float]:
    """The Ray resources one pod of a group offers, as the Ray autoscaler computes them:
    the group's ``resources`` field, then rayStartParams, then the container's limits."""
    declared = {str(k): v for k, v in _d(group.get("resources")).items()}
    params = _d(group.get("rayStartParams"))
    containers = _l(_d(_d(group.get("template")).get("spec")).get("containers"))
    first = _d(containers[0]) if containers else {}
    limits = _container_resources(first, "limits") or _container_resources(first, "requests")

    def pick(*values: Any) -> float:
        return quantity(next((v for v in values if v is not None), 0))

    offered = {"CPU": pick(declared.get("CPU"), params.get("num-cpus"), limits.get("cpu")),
               "GPU": pick(declared.get("GPU"), params.get("num-gpus"), limits.get(GPU_RESOURCE)),
               "memory": pick(declared.get("memory"), params.get("memory"), limits.get("memory"))}
    custom = {k: quantity(v) for k, v in declared.items() if k not in ("CPU", "GPU", "memory",
                                                                       "TPU")}
    if not declared and "resources" in params:
        custom = _ray_resources_param(str(params["resources"]))
    return offered | custom


def actor_needs(options: dict[str, Any]) -> dict[str, float]:
    """The Ray resources of a Serve replica from its ``ray_actor_options``."""
    needs = {"CPU": _num(options.get("num_cpus", 1)),  # Serve's default is one CPU
             "GPU": _num(options.get("num_gpus")),
             "memory": _num(options.get("memory"))}
    needs |= {str(k): _num(v) for k, v in _d(options.get("resources")).items()}
    if options.get("accelerator_type"):
        needs[f"accelerator_type:{options['accelerator_type']}"] = 0.001  # Ray's own request
    return {k: v for k, v in needs.items() if v > 0}


def _fits(needs: dict[str, float], offered: dict[str, float]) -> bool:
    return all(offered.get(k, 0) >= v for k, v in needs.items())


def _describe(resources: dict[str, float]) -> str:
    shown = {k: (f"{v / 2**30:g}GiB" if k == "memory" else f"{v:g}")
             for k, v in sorted(resources.items()) if v > 0}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "nothing"


def _replica_shapes(deployment: dict[str, Any]) -> list[dict[str, float]]:
    """What must fit on one pod: the actor, or its placement-group bundles."""
    bundles = [{str(k): _num(v) for k, v in _d(b).items() if _num(v) > 0}
               for b in _l(deployment.get("placement_group_bundles"))]
    if not bundles:
        return [actor_needs(_d(deployment.get("ray_actor_options")))]
    if deployment.get("placement_group_strategy") == "STRICT_PACK":
        total: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0) + v
        return [total]
    return bundles
