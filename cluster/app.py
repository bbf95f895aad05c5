"""The Serve application builder, ``import_path: cluster.app:build_app``: the one place that
reads the configuration and wires the layers together.

The same builder serves the local default (``cluster up``) and a KubeRay RayService, whose
generated ``serveConfigV2`` passes the whole catalog as ``args.models``. Settings are read
from the environment here, validated, and handed down through ``bind``: nothing below this
module reads the environment.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.api.ingress import Ingress
from cluster.config.catalog import ModelSpec, load_catalog
from cluster.config.serve_options import ingress_options, replica_options
from cluster.config.settings import Profile, Settings
from cluster.serving.engine import Engine
from cluster.serving.replica import ModelReplica


def specs_from_args(args: dict[str, Any], settings: Settings) -> list[ModelSpec]:
    """``{"models": [...]}`` (generated configs) or ``{"profile"}`` (the settings' catalog)."""
    if "models" in args:
        return [ModelSpec.model_validate(m) for m in args["models"]]
    return load_catalog(settings.deployments_dir, Profile(args.get("profile", settings.profile)))


def build(settings: Settings, specs: list[ModelSpec],
          engine_cls: type[Engine] | None = None) -> Application:
    """The application for ``specs``; ``engine_cls`` is injectable, as in Ray Serve LLM."""
    handles = {}
    for spec in specs:
        replica = ModelReplica.options(**replica_options(spec))  # type: ignore[attr-defined]
        handles[spec.id] = replica.bind(spec, settings.cache_dir, engine_cls)
    ingress = Ingress.options(**ingress_options(settings))  # type: ignore[attr-defined]
    return ingress.bind(settings, specs, handles)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve's entry point: settings from the environment of the process that builds."""
    settings = Settings()
    return build(settings, specs_from_args(args or {}, settings))
