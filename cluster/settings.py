"""Process-wide settings, read once from the environment (prefix ``CLUSTER_``).

Everything an operator tunes without editing a deployment file lives here; the per-model
knobs live in ``deployments/*.yaml`` (see :mod:`cluster.catalog`).
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Profile(StrEnum):
    """Which deployment files are served: the small CPU models or the GPU fleet."""

    local = "local"
    gpu = "gpu"


class RedisFailMode(StrEnum):
    """What admission does while Redis is unreachable."""

    closed = "closed"  # refuse with 503
    open = "open"  # per-replica in-memory limits until Redis returns


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLUSTER_", extra="ignore")

    profile: Profile = Profile.local
    deployments_dir: Path = REPO_ROOT / "deployments"
    cache_dir: Path = Field(default=Path.home() / ".cache" / "cluster")

    host: str = "127.0.0.1"
    port: int = 8000

    # Redis: unset means "start a local server" for `cluster up`; the ingress needs a URL.
    redis_url: str | None = None
    redis_fail_mode: RedisFailMode = RedisFailMode.closed
    # Bootstrap admin key for the admin API (a secret in k8s).
    admin_key: str | None = None
    # Requests without a key are refused unless this is on (local demos only).
    allow_anonymous: bool = False

    ingress_max_ongoing_requests: int = 1000
    ingress_min_replicas: int = 1
    ingress_max_replicas: int = 1
    ingress_num_cpus: float = 0.1


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
