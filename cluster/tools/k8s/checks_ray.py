"""Semantic checks of RayServices and RayClusters: KubeRay's name limits, the head group, and the
Serve config (Ray's schema, importable applications, a worker group for every deployment, the
pods' CLUSTER_PROFILE)."""

from __future__ import annotations

import importlib
import re
from functools import lru_cache
from typing import Any

import yaml

from cluster.tools.k8s.manifests import (
    Template,
    _d,
    _l,
    _num,
    _path,
    _ref,
    pod_templates,
    ray_cluster_spec,
)
from cluster.tools.k8s.problems import Problem
from cluster.tools.k8s.resources import (
    GPU_RESOURCE,
    _container_resources,
    _describe,
    _fits,
    _replica_shapes,
    group_resources,
    quantity,
)

# KubeRay: a RayCluster name leaves room for "-serve-svc" in a 63-character Service name, and
# a RayService's for the "-xxxxx" suffix of the RayCluster it creates.
MAX_RAYCLUSTER_NAME = 53
MAX_RAYSERVICE_NAME = MAX_RAYCLUSTER_NAME - 6
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def name_problems(doc: dict[str, Any], source: str) -> list[Problem]:
    name = str(_d(doc.get("metadata")).get("name", ""))
    limit = MAX_RAYSERVICE_NAME if doc.get("kind") == "RayService" else MAX_RAYCLUSTER_NAME
    problems = []
    if len(name) > limit:
        problems.append(Problem(source, _ref(doc), "name-length",
                                f"name has {len(name)} characters; KubeRay allows at most "
                                f"{limit} for a {doc.get('kind')}"))
    if not DNS1035.match(name):
        problems.append(Problem(source, _ref(doc), "name-length",
                                f"name {name!r} is not a DNS-1035 label"))
    return problems


def head_problems(doc: dict[str, Any], source: str) -> list[Problem]:
    """The head holds the GCS and the Serve controller: no GPUs and no replicas on it."""
    head = _d(ray_cluster_spec(doc).get("headGroupSpec"))
    params, declared = _d(head.get("rayStartParams")), _d(head.get("resources"))
    problems = []
    for param, key in (("num-cpus", "CPU"), ("num-gpus", "GPU")):
        value = declared.get(key, params.get(param))
        if value is None or str(value).strip() != "0":
            problems.append(Problem(source, _ref(doc), "head-group",
                                    f"headGroupSpec: {param} is {value!r}, must be \"0\" so no "
                                    f"Serve replica or GPU work is scheduled on the head"))
    tpl = Template(doc, "headGroupSpec", _d(head.get("template")))
    for c in tpl.containers():
        gpus = _container_resources(c, "limits").get(GPU_RESOURCE)
        if gpus is not None and quantity(gpus) > 0:
            problems.append(Problem(source, _ref(doc), "head-group",
                                    f"headGroupSpec container {c.get('name')!r} requests "
                                    f"{gpus} GPUs; the head must not hold any"))
    return problems


class ImportPathError(Exception):
    pass


@lru_cache(maxsize=32)
def resolve_import_path(import_path: str) -> object:
    """Import ``module:attr`` (or ``module.attr``, as Serve accepts) and return the attribute."""
    module_name, sep, attr = import_path.partition(":")
    if not sep:
        module_name, _, attr = import_path.rpartition(".")
    if not module_name or not attr:
        raise ImportPathError(f"{import_path!r} is not of the form module:attribute")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure is the finding
        raise ImportPathError(f"cannot import {module_name!r}: {e!r}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportPathError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def parse_serve_config(doc: dict[str, Any], source: str
                       ) -> tuple[dict[str, Any] | None, list[Problem]]:
    """serveConfigV2 as a dict, checked with Ray's own schema of ``serve deploy`` files."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema  # ray is slow to import

    raw = _d(doc.get("spec")).get("serveConfigV2")
    if not isinstance(raw, str) or not raw.strip():
        return None, [Problem(source, _ref(doc), "serve-config", "spec.serveConfigV2 is empty")]
    try:
        config = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        return None, [Problem(source, _ref(doc), "serve-config", f"not YAML: {e}")]
    if not isinstance(config, dict):
        return None, [Problem(source, _ref(doc), "serve-config", "not a YAML mapping")]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return config, [Problem(source, _ref(doc), "serve-config",
                                f"{_path(err['loc'])}: {err['msg']}") for err in e.errors()]
    return config, []


def import_problems(doc: dict[str, Any], config: dict[str, Any], source: str) -> list[Problem]:
    problems = []
    for app in map(_d, _l(config.get("applications"))):
        path = str(app.get("import_path", ""))
        try:
            target = resolve_import_path(path)
        except ImportPathError as e:
            problems.append(Problem(source, _ref(doc), "import-path",
                                    f"application {app.get('name')!r}: {e}"))
            continue
        if app.get("args") is not None and not callable(target):
            problems.append(Problem(source, _ref(doc), "import-path",
                                    f"application {app.get('name')!r}: {path} takes args, so it "
                                    f"must be an application builder (a callable)"))
    return problems


def worker_group_problems(doc: dict[str, Any], config: dict[str, Any],
                          source: str) -> list[Problem]:
    """Every Serve deployment fits on one pod of some worker group (the head takes none)."""
    groups = {str(g.get("groupName")): group_resources(g)
              for g in map(_d, _l(ray_cluster_spec(doc).get("workerGroupSpecs")))
              if _num(g.get("maxReplicas", 1)) > 0}
    offered = "; ".join(f"{n}: {_describe(r)}" for n, r in groups.items()) or "no worker groups"
    problems = []
    for app in map(_d, _l(config.get("applications"))):
        for dep in map(_d, _l(app.get("deployments"))):
            for needs in _replica_shapes(dep):
                if not any(_fits(needs, r) for r in groups.values()):
                    problems.append(Problem(
                        source, _ref(doc), "worker-group",
                        f"deployment {dep.get('name')!r} needs {_describe(needs)} on one pod, "
                        f"and no worker group offers it ({offered})"))
    return problems


def _env_values(container: dict[str, Any], configmaps: dict[str, dict[str, str]]
                ) -> dict[str, str]:
    """Literal environment of a container: ConfigMaps from envFrom, then env values."""
    env: dict[str, str] = {}
    for src in map(_d, _l(container.get("envFrom"))):
        name = str(_d(src.get("configMapRef")).get("name"))
        env |= {str(src.get("prefix", "")) + k: v for k, v in configmaps.get(name, {}).items()}
    for var in map(_d, _l(container.get("env"))):
        if "value" in var:
            env[str(var.get("name"))] = str(var["value"])
    return env


def profile_problems(doc: dict[str, Any], config: dict[str, Any], source: str,
                     configmaps: dict[str, dict[str, str]]) -> list[Problem]:
    """CLUSTER_PROFILE on the Ray pods agrees with the profile of every served model."""
    models = [_d(m) for app in map(_d, _l(config.get("applications")))
              for m in _l(_d(app.get("args")).get("models"))]
    set_on = {tpl.where: env["CLUSTER_PROFILE"] for tpl in pod_templates(doc)
              for c in tpl.containers(init=False)
              if "CLUSTER_PROFILE" in (env := _env_values(c, configmaps))}
    problems = []
    for profile in sorted(set(set_on.values())):
        wrong = sorted({str(m.get("id")) for m in models if m.get("profile") != profile})
        if wrong:
            where = ", ".join(w for w, p in set_on.items() if p == profile)
            problems.append(Problem(source, _ref(doc), "profile",
                                    f"CLUSTER_PROFILE={profile} ({where}) but the Serve config "
                                    f"has models of another profile: {', '.join(wrong)}"))
    return problems


def ray_problems(doc: dict[str, Any], source: str,
                 configmaps: dict[str, dict[str, str]]) -> list[Problem]:
    problems = name_problems(doc, source) + head_problems(doc, source)
    if doc.get("kind") != "RayService":
        return problems
    config, found = parse_serve_config(doc, source)
    problems += found
    if config is not None:
        problems += import_problems(doc, config, source)
        problems += worker_group_problems(doc, config, source)
        problems += profile_problems(doc, config, source, configmaps)
    return problems
