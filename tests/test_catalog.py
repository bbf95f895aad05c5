"""Deployment files: the shipped ones load, bad ones fail naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config.catalog import CatalogError, Pricing, load_catalog, load_spec
from cluster.config.settings import Profile
from cluster.tools.checkout import REPO_ROOT

SEED_MODELS = {
    "lizpreciatior/lzlv_70b_fp16_hf", "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "codellama/CodeLlama-70b-Instruct-hf", "meta-llama/Llama-2-70b-chat-hf",
    "microsoft/WizardLM-2-8x22B",
}


def test_shipped_files_cover_the_seed_models() -> None:
    gpu = load_catalog(REPO_ROOT / "deployments", Profile.gpu)
    assert {s.id for s in gpu} == SEED_MODELS
    llama33 = next(s for s in gpu if s.id == "meta-llama/Llama-3.3-70B-Instruct-Turbo")
    assert (llama33.pricing.input_per_million, llama33.pricing.output_per_million) == \
        (0.13, 0.38)
    assert llama33.engine.quantization == "fp8"
    wizard = next(s for s in gpu if s.id == "microsoft/WizardLM-2-8x22B")
    assert wizard.pricing.input_per_million == wizard.pricing.output_per_million == 0.48
    for spec in gpu:
        assert spec.resources.num_gpus >= spec.engine.tensor_parallel_size
    local = load_catalog(REPO_ROOT / "deployments", Profile.local)
    assert [s.id for s in local] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]


def test_cost_arithmetic_matches_prices() -> None:
    spec = load_spec(REPO_ROOT / "deployments" / "llama-3.3-70b-instruct-turbo.yaml")
    assert spec.pricing.cost(149, 338) == pytest.approx((149 * 0.13 + 338 * 0.38) / 1e6)


def test_cached_prompt_tokens_have_their_own_price() -> None:
    priced = Pricing(input_per_million=1.0, output_per_million=4.0,
                     cached_input_per_million=0.25)
    assert priced.cost_nano(100, 10, cached_tokens=60) == 40 * 1000 + 60 * 250 + 10 * 4000
    assert priced.cost(100, 10, 60) == 95_000 / 1e9
    assert priced.cost_nano(10, 0, cached_tokens=50) == 10 * 250  # at most the prompt
    same = Pricing(input_per_million=1.0, output_per_million=4.0)  # none set: input price
    assert same.cost_nano(100, 0, cached_tokens=60) == 100_000
    with pytest.raises(ValueError, match="cannot exceed"):
        Pricing(input_per_million=1.0, output_per_million=1.0, cached_input_per_million=2.0)


@pytest.mark.parametrize(("old", "new", "field"), [
    ("max_model_len: 131072", "max_model_len: -1", "engine.max_model_len"),
    ("quantization: fp8", "quantisation: fp8", "engine.quantisation"),
    ("tensor_parallel_size: 2", "tensor_parallel_size: 4", "num_gpus"),
    ("input_per_million: 0.13", "input_per_million: cheap", "pricing.input_per_million"),
])
def test_bad_file_names_file_and_field(tmp_path: Path, old: str, new: str,
                                       field: str) -> None:
    text = (REPO_ROOT / "deployments" / "llama-3.3-70b-instruct-turbo.yaml").read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(CatalogError) as err:
        load_spec(bad)
    assert str(bad) in str(err.value) and field in str(err.value)


def test_missing_source_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "id: a/b\nprofile: local\nsource: {}\nengine: {max_model_len: 64}\n"
        "pricing: {input_per_million: 0, output_per_million: 0}\n")
    with pytest.raises(CatalogError, match="exactly one of hf, path, builtin"):
        load_catalog(tmp_path)
