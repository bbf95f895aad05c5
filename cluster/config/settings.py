"""Process-wide settings (prefix ``CLUSTER_``), read from the environment once, at the top
(the Serve application builder, the CLI), and passed down from there.

Everything an operator tunes without editing a deployment file lives here; the per-model
knobs live in ``deployments/*.yaml`` (see :mod:`cluster.config.catalog`).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Profile(StrEnum):
    """Which deployment files are served: the small CPU models or the GPU fleet."""

    local = "local"
    gpu = "gpu"


class RedisFailMode(StrEnum):
    """What admission does while Redis is unreachable."""

    closed = "closed"  # refuse with 503
    open = "open"  # per-replica in-memory limits until Redis returns


class LimitDefaults(BaseModel):
    """Limits of keys that set none, of the anonymous key, and the global per-model TPM.

    Per-minute figures; 0 means no limit. Env: ``CLUSTER_LIMITS='{"rpm": 100}'`` or
    ``CLUSTER_LIMITS__RPM=100``. See :mod:`cluster.gate.redis_gate`.
    """

    rpm: int = Field(60, ge=0)
    tpm: int = Field(100_000, ge=0)
    max_concurrent: int = Field(8, ge=0)
    model_tpm: dict[str, int] = Field(default_factory=dict)  # model id -> tokens/min, all keys
    default_model_tpm: int = Field(0, ge=0)  # for models not in model_tpm
    slot_lease_s: float = Field(600, gt=0)  # a concurrency slot of a dead replica frees after
    redis_timeout_s: float = Field(1.0, gt=0)  # socket timeouts: a dead Redis must not hang
    redis_max_connections: int = Field(64, ge=1)  # per replica; callers queue for one
    redis_retry_s: float = Field(1.0, ge=0)  # after a failure, skip Redis this long


AbuseAction = Literal["flag", "throttle", "block"]  # what the monitor does to a flagged user


class AbuseRules(BaseModel):
    """Rules that flag users of a key, and what the abuse monitor does about them.

    One ingress replica at a time (the holder of a lease in Redis) evaluates the rules every
    ``evaluate_every_s`` and applies each key's policy (:mod:`cluster.gate.monitor`); keys
    without a policy get ``default_action``, ``throttle_rpm`` and ``action_minutes``.
    ``cluster users flagged`` evaluates them on demand too.
    """

    retention_minutes: int = Field(24 * 60, ge=10)  # activity buckets kept this long
    burst_factor: float = Field(5.0, gt=1)  # recent rate over N x the user's baseline
    burst_window_minutes: int = Field(5, ge=1)
    baseline_minutes: int = Field(60, ge=1)  # the window before the burst window
    burst_min_requests: int = Field(30, ge=1)
    window_minutes: int = Field(10, ge=1)  # of the 429 and max-length rules
    rejected_429_threshold: int = Field(20, ge=1)
    maxlen_fraction: float = Field(0.9, gt=0, le=1)  # reserve >= this x context = "max length"
    maxlen_share: float = Field(0.8, gt=0, le=1)
    maxlen_min_requests: int = Field(20, ge=1)
    spend_retention_days: int = Field(400, ge=1)
    evaluate_every_s: float = Field(30, gt=0)
    # A leader that stops renewing (its replica died) is replaced after this; None: 3 periods.
    leader_lease_s: float | None = Field(None, gt=0)
    default_action: AbuseAction = "flag"
    throttle_rpm: int = Field(10, ge=1)  # requests/min of a throttled user
    action_minutes: int = Field(60, ge=1)  # how long a throttle or block lasts

    @model_validator(mode="after")
    def _lease_outlives_a_period(self) -> AbuseRules:
        """The leader renews once a period: a lease no longer than that would lapse between
        two renewals and let two replicas evaluate at once."""
        if self.leader_lease_s is None:
            self.leader_lease_s = 3 * self.evaluate_every_s
        elif self.leader_lease_s <= self.evaluate_every_s:
            raise ValueError("leader_lease_s must be longer than evaluate_every_s")
        return self

    @property
    def lease_s(self) -> float:
        """The leader lease, seconds (``leader_lease_s`` or its default)."""
        return self.leader_lease_s or 3 * self.evaluate_every_s


class LedgerSettings(BaseModel):
    """The usage ledger (a Redis Stream, about 300 bytes a request) and settlement retries.
    Env: ``CLUSTER_LEDGER__RETENTION_DAYS=35``. See :mod:`cluster.gate.ledger`."""

    retention_days: float = Field(35, gt=0)  # entries older than this are trimmed
    # A request's settlement is applied once within this long, however often it is retried.
    dedupe_hours: float = Field(24, gt=0)
    # Settlements kept in an ingress replica's memory while Redis is down, resent when it
    # returns; beyond this many the oldest are dropped (counted and logged).
    pending_max: int = Field(100_000, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLUSTER_", extra="ignore",
                                      env_nested_delimiter="__")

    profile: Profile = Profile.local
    deployments_dir: Path | None = None  # None: the catalog shipped with the package
    cache_dir: Path = Field(default=Path.home() / ".cache" / "cluster")

    host: str = "127.0.0.1"
    port: int = 8000

    # Redis: unset means "start a local server" for `cluster up`; the ingress needs a URL.
    redis_url: str | None = None
    redis_fail_mode: RedisFailMode = RedisFailMode.closed
    # Bootstrap admin key for the admin API (a secret in k8s).
    admin_key: SecretStr | None = None
    # A client with this many refused admin requests within the window is refused (429)
    # until the window ends, right key or not: the admin key cannot be guessed by trying.
    admin_max_failures: int = Field(10, ge=1)
    admin_lockout_s: int = Field(300, ge=1)
    # Requests without a key are refused unless this is on (local demos only).
    allow_anonymous: bool = False
    limits: LimitDefaults = LimitDefaults()
    abuse: AbuseRules = AbuseRules()
    ledger: LedgerSettings = LedgerSettings()

    ingress_max_ongoing_requests: int = 1000
    ingress_min_replicas: int = 1
    ingress_max_replicas: int = 1
    ingress_num_cpus: float = 0.1
