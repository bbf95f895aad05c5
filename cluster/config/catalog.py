"""The model catalog: one declarative YAML file per served model in ``deployments/``.

A file declares the public model id, where its weights come from, the vLLM engine
arguments, the Ray resources and autoscaling of its replicas, and its per-token prices.
Files are validated on load; a bad file raises :class:`CatalogError` naming file and field.
The default catalog ships inside the package (``setup.py`` copies ``deployments/`` into the
wheel), so an installed ``cluster`` finds it without the source checkout.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.config.settings import Profile


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


BUILTIN_READY = ".cluster-ready.json"  # written last into a built-in model's directory


def builtin_dir(cache_dir: Path, name: str) -> Path:
    """Where ``cluster up`` (:mod:`cluster.tools.builtin_models`) builds a built-in model."""
    return cache_dir / "models" / name


class Endpoint(StrEnum):
    """The OpenAI APIs a model can serve; each model file lists the ones it does."""

    chat = "chat"  # POST /v1/chat/completions: messages, rendered with the chat template
    completion = "completion"  # POST /v1/completions: a raw prompt, continued

    @property
    def path(self) -> str:
        return {"chat": "/v1/chat/completions", "completion": "/v1/completions"}[self.value]


class Source(_Strict):
    """Where the weights come from: exactly one of ``hf``, ``path`` or ``builtin``."""

    hf: str | None = None  # a hub repo id, fetched by vLLM on the GPU nodes
    path: str | None = None  # a directory already on every node
    builtin: Literal["smollm2-135m-instruct"] | None = None  # made locally, no hub needed

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("hf", "path", "builtin") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of hf, path, builtin")
        return self

    def resolve(self, cache_dir: Path) -> str:
        """The directory or hub id vLLM loads. A built-in model must have been built (by
        ``cluster up``, or into the image): a replica never builds one."""
        if self.builtin:
            path = builtin_dir(cache_dir, self.builtin)
            if not (path / BUILTIN_READY).is_file():
                raise CatalogError(f"the built-in model {self.builtin!r} is not prepared in "
                                   f"{path}: run `cluster models prepare` first")
            return str(path)
        if self.path:
            return str(Path(self.path).expanduser())
        assert self.hf is not None
        return self.hf


class Engine(_Strict):
    """vLLM engine arguments. ``extra`` passes any other ``AsyncEngineArgs`` field."""

    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    quantization: str | None = None
    max_model_len: int = Field(ge=16)
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    max_num_seqs: int = Field(256, ge=1)
    tool_call_parser: str | None = None
    chat_template: str | None = None  # a Jinja template, for models shipped without one
    # OpenMP threads of a CPU engine (OMP_NUM_THREADS of its replica). Unset, Ray derives it
    # from resources.num_cpus (1 for a fractional CPU), which starves a CPU engine.
    cpu_threads: int | None = Field(None, ge=1)
    extra: dict[str, Any] = Field(default_factory=dict)


class Resources(_Strict):
    """Ray resources of one replica. GPUs are the tensor-parallel width."""

    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, gt=0)
    accelerator_type: str | None = None  # Ray accelerator label, e.g. "H100"
    memory_gib: float | None = Field(None, gt=0)


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    initial_replicas: int | None = Field(None, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(30, ge=0)
    downscale_delay_s: float = Field(600, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class Streaming(_Strict):
    """How a replica spaces stream messages when busy (see cluster/streaming.py)."""

    busy_streams: int = Field(4, ge=0)  # more concurrent streams than this = busy
    busy_interval_ms: float = Field(20, ge=0)  # then at most one message per stream per this


class Pricing(_Strict):
    """USD per one million tokens. Costs are counted in whole nano-dollars (1e-9 USD), so
    budgets, spend and the usage ledger add up exactly; a response's ``estimated_cost`` is
    that figure in USD."""

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    # Prompt tokens the engine served from its prefix cache (vLLM reports them as
    # ``prompt_tokens_details.cached_tokens``); None: the input price.
    cached_input_per_million: float | None = Field(None, ge=0)
    note: str | None = None  # where the price comes from

    @model_validator(mode="after")
    def _cached_not_dearer(self) -> Pricing:
        if (self.cached_input_per_million or 0) > self.input_per_million:
            raise ValueError("cached_input_per_million cannot exceed input_per_million")
        return self

    @property
    def cached_per_million(self) -> float:
        cached = self.cached_input_per_million
        return self.input_per_million if cached is None else cached

    def cost_nano(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
                  ) -> int:
        """The cost in nano-dollars; ``cached_tokens`` are part of ``prompt_tokens``."""
        cached = min(max(0, cached_tokens), max(0, prompt_tokens))
        per_million = ((prompt_tokens - cached) * self.input_per_million
                       + cached * self.cached_per_million
                       + completion_tokens * self.output_per_million)
        return round(per_million * 1000)  # USD per 1e6 tokens = 1000 nano-USD per token

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
             ) -> float:
        return self.cost_nano(prompt_tokens, completion_tokens, cached_tokens) / 1e9


class ModelSpec(_Strict):
    """One served model, as declared in its deployment file."""

    id: str = Field(min_length=1, description="the public `model` value clients send")
    profile: Profile
    description: str = ""
    source: Source
    engine: Engine
    resources: Resources = Resources()
    autoscaling: Autoscaling = Autoscaling()
    max_ongoing_requests: int = Field(64, ge=1)
    # Requests each ingress replica may queue for this model when every replica is at
    # max_ongoing_requests; beyond it, a 503 with Retry-After. -1: no bound (they wait, and
    # the autoscaler sees them).
    max_queued_requests: int = Field(-1, ge=-1)
    # Extra replicas (% of the target, rounded up) Serve may start during a rolling restart
    # of this model: > 0 starts each replacement before stopping the old replica, so a
    # one-replica model stays up while the new one loads, if a GPU is spare or the
    # autoscaler can add one (meanwhile the old replica serves). 0 stops first.
    max_surge_percent: int = Field(0, ge=0, le=100)
    streaming: Streaming = Streaming()
    # Reserved for rate limiting when a request gives no max_tokens.
    default_max_tokens: int = Field(512, ge=1)
    endpoints: tuple[Endpoint, ...] = Field((Endpoint.chat, Endpoint.completion), min_length=1)
    # The most choices one request may ask for: `n`, times the prompts of a completion.
    max_choices: int = Field(8, ge=1, le=128)
    pricing: Pricing

    @model_validator(mode="after")
    def _gpus_cover_parallelism(self) -> ModelSpec:
        width = self.engine.tensor_parallel_size * self.engine.pipeline_parallel_size
        if self.resources.num_gpus and self.resources.num_gpus < width:
            raise ValueError(
                f"resources.num_gpus={self.resources.num_gpus} is less than "
                f"tensor_parallel_size*pipeline_parallel_size={width}")
        return self

    @property
    def deployment_name(self) -> str:
        """A Serve deployment name derived from the id (Serve names must be simple)."""
        return "model-" + re.sub(r"[^a-z0-9]+", "-", self.id.lower()).strip("-")


class CatalogError(ValueError):
    """A deployment file is missing, unreadable or invalid."""


def load_spec(path: Path) -> ModelSpec:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CatalogError(f"{path}: cannot read: {e}") from e
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<file>'}: {err['msg']}"
            for err in e.errors())
        raise CatalogError(f"{path}: {problems}") from e


def default_deployments_dir() -> Path:
    """The catalog shipped in the package (a wheel), else the source checkout's."""
    packaged = Path(__file__).resolve().parent / "deployments"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "deployments"


def load_catalog(directory: Path | None = None, profile: Profile | None = None
                 ) -> list[ModelSpec]:
    """All specs in ``directory`` (``*.yaml``; default: :func:`default_deployments_dir`),
    optionally only one profile's, sorted by id."""
    directory = directory or default_deployments_dir()
    specs = [load_spec(p) for p in sorted(directory.glob("*.yaml"))]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.deployment_name in seen:
            raise CatalogError(f"{directory}: model ids {seen[spec.deployment_name]!r} and "
                               f"{spec.id!r} map to one deployment name")
        seen[spec.deployment_name] = spec.id
    chosen = [s for s in specs if profile is None or s.profile == profile]
    if not chosen:
        raise CatalogError(f"{directory}: no deployment file for profile {profile}")
    return sorted(chosen, key=lambda s: s.id)
