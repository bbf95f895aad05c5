"""Rendering manifests: a file as is, a kustomization with ``kubectl kustomize`` (no API server
needed), with throwaway values for missing secret files in a temporary copy."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from cluster.tools.checkout import REPO_ROOT
from cluster.tools.k8s.problems import K8sError
from cluster.tools.k8s.secret_files import new_secret_values, secret_sources, write_secret_files

K8S_DIR = REPO_ROOT / "k8s"

try:  # the C loader reads the 1 MB RayService CRD ~10x faster
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader


def kustomize(directory: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise K8sError("kubectl is not on PATH (`kubectl kustomize` renders the overlays)")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise K8sError(f"kubectl kustomize {directory} failed: {done.stderr.strip()}")
    return done.stdout


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=_Loader) if d]


def render(path: Path, placeholder_secrets: bool = True) -> list[dict[str, Any]]:
    """The objects of a manifest file, or of a kustomization rendered by kubectl.

    Secret env files are git-ignored, so CI has none: with ``placeholder_secrets`` the
    kustomization is rendered from a temporary copy with throwaway values in the missing
    files. Nothing is written next to the real ones, so a placeholder can never be applied.
    """
    if path.is_file():
        return load_docs(path.read_text())
    missing = [p for p in secret_sources(path) if not p.exists()]
    if not missing:
        return load_docs(kustomize(path))
    if not placeholder_secrets:
        raise K8sError(f"missing secret files {', '.join(map(str, missing))}: create them "
                       f"(`cluster k8s secrets OVERLAY`, see secrets/README.md)")
    root = K8S_DIR if path.resolve().is_relative_to(K8S_DIR.resolve()) else path.resolve()
    with tempfile.TemporaryDirectory(prefix="k8s-render-") as tmp:
        copy_root = Path(tmp) / root.name
        shutil.copytree(root, copy_root)
        copy_dir = copy_root / path.resolve().relative_to(root.resolve())
        values = new_secret_values(None, placeholder=True)
        for p in missing:
            if not p.resolve().is_relative_to(root.resolve()):
                raise K8sError(f"{p} is outside {root}: create it to render {path}")
            rel = p.resolve().relative_to(root.resolve())
            write_secret_files((copy_root / rel).parent, [rel.name], values)
        return load_docs(kustomize(copy_dir))
