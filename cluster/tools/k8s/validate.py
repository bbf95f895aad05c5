"""``cluster k8s validate`` without the CLI: render a target, then run the schema and the
semantic checks on its objects."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from cluster.tools.checkout import REPO_ROOT
from cluster.tools.k8s.checks import semantic_problems
from cluster.tools.k8s.checks_security import policy_problems
from cluster.tools.k8s.problems import K8sError, Problem
from cluster.tools.k8s.render import K8S_DIR, render
from cluster.tools.k8s.schema import DEFAULT_KUBE_VERSION, drop_nulls, schema_problems


def validate_docs(docs: list[dict[str, Any]], source: str, crds: tuple[Path, ...],
                  kube_version: str = DEFAULT_KUBE_VERSION) -> list[Problem]:
    docs = [copy.deepcopy(d) for d in docs if isinstance(d, dict)]
    problems = [p for d in docs for p in schema_problems(d, source, crds, kube_version)]
    return problems + semantic_problems([drop_nulls(d) for d in docs], source)


def resolve_target(target: str, k8s_dir: Path = K8S_DIR) -> Path:
    """An overlay name ("gpu") or a path (a kustomization directory or a manifest file)."""
    overlay = k8s_dir / "overlays" / target
    if "/" not in target and overlay.is_dir():
        return overlay
    path = Path(target)
    if not path.exists():
        raise K8sError(f"{target}: neither an overlay of {k8s_dir / 'overlays'} nor a path")
    return path


def validate_target(path: Path, crds: tuple[Path, ...], kube_version: str = DEFAULT_KUBE_VERSION,
                    placeholder_secrets: bool = True) -> tuple[int, list[Problem]]:
    """(number of objects, problems) for one overlay or manifest file. An overlay (a
    directory) must also bring the NetworkPolicies and the Ray token's Secret."""
    full = path.resolve()
    source = str(full.relative_to(REPO_ROOT)) if full.is_relative_to(REPO_ROOT) else str(path)
    docs = render(path, placeholder_secrets)
    problems = validate_docs(docs, source, crds, kube_version)
    if path.is_dir():
        problems += policy_problems([d for d in docs if isinstance(d, dict)], source)
    return len(docs), problems
