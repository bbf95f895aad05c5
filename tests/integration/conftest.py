"""One real local stack for the integration tests: Redis, Ray, Serve and vLLM on the CPU.

Models: two deployments of a tiny random model built here (routing tests, fast generation)
and the real SmolLM2-135M-Instruct made from the PyPI wheel (answers questions).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cluster.config.catalog import ModelSpec, load_spec
from cluster.config.settings import AbuseRules, LimitDefaults, Settings
from cluster.tools.checkout import REPO_ROOT
from cluster.tools.redis_server import free_port
from cluster.tools.stack import LocalStack
from tests.support.tiny_model import build_tiny_model

TINY_A = "test/tiny-a"
TINY_B = "test/tiny-b"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def tiny_spec(model_id: str, path: Path, cached_price: float | None = None) -> ModelSpec:
    pricing = {"input_per_million": 1.5, "output_per_million": 3.0,
               "cached_input_per_million": cached_price}
    return ModelSpec.model_validate({
        "id": model_id, "profile": "local", "source": {"path": str(path)},
        "engine": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True,
                   "max_num_seqs": 8},
        "resources": {"num_cpus": 0.25},
        "max_ongoing_requests": 16,
        "pricing": pricing})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def stack(tiny_model: Path) -> Iterator[LocalStack]:
    smol = load_spec(REPO_ROOT / "deployments" / "smollm2-135m-instruct.yaml")
    # tiny-b prices prompt tokens served from the prefix cache at a fifth (billing tests)
    specs = [tiny_spec(TINY_A, tiny_model), tiny_spec(TINY_B, tiny_model, cached_price=0.3),
             smol]
    # Limits high enough for the shared key; two ingress replicas: limits must hold across them.
    # The abuse monitor evaluates every 2 s and flags bursts from 10 requests (the default
    # policy only records flags, so other tests' users are never throttled).
    settings = Settings(limits=LimitDefaults(rpm=100_000, tpm=0, max_concurrent=0),
                        abuse=AbuseRules(evaluate_every_s=2, burst_min_requests=10),
                        ingress_min_replicas=2, ingress_max_replicas=2)
    stack = LocalStack(specs, settings, port=free_port())  # with the dashboard, as `up`
    try:
        stack.start(progress=print)
        stack.wait_healthy(timeout_s=600)
        yield stack
    finally:
        stack.stop()


SESSION_KEY = "sk-integration-session-key"


def create_key(stack: LocalStack, name: str, secret: str | None = None,
               models: list[str] | None = None, **limits: int) -> str:
    """A key in the stack's Redis (the secret is returned; Redis keeps only its hash)."""
    from cluster.gate.keys import KeyLimits, create_key_now

    assert stack.redis_url is not None
    return create_key_now(stack.redis_url, name, KeyLimits(**limits), models, secret).secret


@pytest.fixture(scope="session")
def api_key(stack: LocalStack) -> str:
    return create_key(stack, "integration", secret=SESSION_KEY)


@pytest.fixture(scope="session")
def sdk(stack: LocalStack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1/openai", api_key=api_key,
                         max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(stack: LocalStack, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {api_key}"}) as client:
        yield client


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


