"""vLLM's extra request fields through the real stack, and vLLM's own benchmark client
(`vllm bench serve`, called as a module) run against it unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from cluster.tools.stack import LocalStack
from tests.integration.conftest import SMOL, TINY_A

ASK = [{"role": "user", "content": "What is the capital of France?"}]


def test_ignore_eos_generates_exactly_max_tokens(sdk: openai.OpenAI) -> None:
    short = sdk.chat.completions.create(model=SMOL, messages=ASK, temperature=0, max_tokens=64)
    assert short.usage is not None and short.usage.completion_tokens < 64  # it stops by itself
    long = sdk.chat.completions.create(model=SMOL, messages=ASK, temperature=0, max_tokens=64,
                                       extra_body={"ignore_eos": True})
    assert long.usage is not None and long.usage.completion_tokens == 64
    assert long.choices[0].finish_reason == "length"


def test_min_tokens_holds_off_the_end(sdk: openai.OpenAI) -> None:
    done = sdk.chat.completions.create(
        model=SMOL, temperature=0, max_tokens=40, extra_body={"min_tokens": 30},
        messages=[{"role": "user", "content": "Answer with one word: yes or no?"}])
    assert done.usage is not None and done.usage.completion_tokens >= 30


def test_structured_outputs_choice(sdk: openai.OpenAI) -> None:
    done = sdk.chat.completions.create(
        model=SMOL, messages=ASK, temperature=0, max_tokens=8,
        extra_body={"structured_outputs": {"choice": ["Paris", "Lyon"]}})
    assert done.choices[0].message.content in ("Paris", "Lyon")


def test_a_field_nobody_knows_is_still_a_400(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=TINY_A, messages=ASK, extra_body={"ignore_eoss": 1})
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "ignore_eoss"


BENCH = """
import sys
from vllm.benchmarks import serve
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser()
serve.add_cli_args(p)
serve.main(p.parse_args(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("backend", "endpoint"), [
    ("openai-chat", "/v1/openai/chat/completions"), ("openai", "/v1/completions")])
def test_vllm_bench_serve_random_dataset_runs_unchanged(stack: LocalStack, api_key: str,
                                                        tiny_model: Path, tmp_path: Path,
                                                        backend: str, endpoint: str) -> None:
    """On chat and on completions. The random dataset sends `ignore_eos: true`; every
    request must succeed."""
    run = subprocess.run(
        [sys.executable, "-c", BENCH, "--backend", backend, "--base-url", stack.base_url,
         "--endpoint", endpoint, "--model", TINY_A,
         "--tokenizer", str(tiny_model), "--dataset-name", "random", "--random-input-len", "32",
         "--random-output-len", "8", "--num-prompts", "6", "--max-concurrency", "3",
         "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"],
        env=os.environ | {"OPENAI_API_KEY": api_key}, capture_output=True, text=True,
        timeout=280)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["total_output_tokens"] == 6 * 8  # ignore_eos: every request ran to the end
