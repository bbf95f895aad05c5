"""The Serve application builder: ``import_path: cluster.app:build_app``.

The same builder serves the local default (``cluster up``) and a KubeRay RayService, whose
generated ``serveConfigV2`` passes the whole catalog as ``args.models``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from cluster.catalog import ModelSpec, load_catalog
from cluster.ingress import Ingress
from cluster.replica import ModelReplica
from cluster.serve_config import ingress_options, replica_options
from cluster.settings import Profile, get_settings


def specs_from_args(args: dict[str, Any]) -> list[ModelSpec]:
    """``{"models": [...]}`` (generated configs) or ``{"profile", "deployments_dir"}``."""
    if "models" in args:
        return [ModelSpec.model_validate(m) for m in args["models"]]
    settings = get_settings()
    profile = Profile(args.get("profile", settings.profile))
    directory = Path(args.get("deployments_dir", settings.deployments_dir))
    return load_catalog(directory, profile)


def build_app(args: dict[str, Any] | None = None) -> Application:
    specs = specs_from_args(args or {})
    engine_cls = args.get("engine_cls") if args else None  # tests inject a fake engine
    handles = {}
    for spec in specs:
        replica = ModelReplica.options(**replica_options(spec))  # type: ignore[attr-defined]
        handles[spec.id] = replica.bind(spec.model_dump(mode="json"), engine_cls)
    ingress = Ingress.options(**ingress_options(get_settings()))  # type: ignore[attr-defined]
    return ingress.bind([s.model_dump(mode="json") for s in specs], handles)
