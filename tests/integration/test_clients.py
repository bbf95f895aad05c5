"""The clients people use, unchanged, against the real stack: the ecosystem's contracts.

LangChain's ``ChatOpenAI`` (invoke, stream, structured output, a tool round trip), the
LiteLLM SDK as a client (chat and text completions, plain and streamed) and vLLM's own
``bench serve`` on the completions API. The openai SDK is in the other modules. Versions are
pinned in pyproject.toml; if one of these breaks, the test names the client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from cluster.tools.stack import LocalStack
from tests.integration.conftest import SMOL, TINY_A
from tests.integration.test_vllm_dialect import BENCH

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from GitHub

ASK = "What is the capital of France? Answer in one word."


def chat_model(stack: LocalStack, api_key: str, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=SMOL, base_url=f"{stack.base_url}/v1/openai", api_key=api_key,
                      temperature=0, max_retries=0, timeout=120, **kwargs)


def test_langchain_invoke_and_stream(stack: LocalStack, api_key: str) -> None:
    llm = chat_model(stack, api_key, max_tokens=20)
    reply = llm.invoke(ASK)
    assert "Paris" in reply.content
    assert reply.usage_metadata and reply.usage_metadata["output_tokens"] > 0
    chunks = list(chat_model(stack, api_key, max_tokens=20, stream_usage=True).stream(ASK))
    assert "Paris" in "".join(str(c.content) for c in chunks)
    assert any(c.usage_metadata for c in chunks)  # the usage chunk reached LangChain


class Capital(BaseModel):
    city: Literal["Paris", "Lyon", "Marseille"]


def test_langchain_structured_output(stack: LocalStack, api_key: str) -> None:
    llm = chat_model(stack, api_key, max_tokens=30)
    answer = llm.with_structured_output(Capital, method="json_schema").invoke(ASK)
    assert isinstance(answer, Capital)


def test_langchain_tool_round_trip(stack: LocalStack, api_key: str) -> None:
    """The tool's result goes back to the model in the next request, as an agent does."""
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def population(city: str) -> int:
        """The population of a city."""
        return 2_100_000

    llm = chat_model(stack, api_key, max_tokens=40).bind_tools([population])
    first = llm.invoke("Call the population tool for Paris.")
    assert isinstance(first, AIMessage)
    # A 135M model may or may not call the tool; the round trip must work either way.
    calls = first.tool_calls or [{"name": "population", "args": {"city": "Paris"},
                                  "id": "call_1", "type": "tool_call"}]
    history = [HumanMessage("How many people live in Paris?"),
               AIMessage(content="", tool_calls=calls),
               ToolMessage(str(population.invoke(calls[0]["args"])),
                           tool_call_id=calls[0]["id"])]
    second = llm.invoke(history)
    assert isinstance(second, AIMessage) and second.response_metadata["finish_reason"] in (
        "stop", "length", "tool_calls")


def test_litellm_sdk_chat_and_text_completion(stack: LocalStack, api_key: str) -> None:
    import litellm

    common = {"api_base": f"{stack.base_url}/v1", "api_key": api_key, "temperature": 0}
    done = litellm.completion(model=f"openai/{SMOL}", messages=[
        {"role": "user", "content": ASK}], max_tokens=20, **common)
    assert "Paris" in done.choices[0].message.content
    assert done.usage.completion_tokens > 0
    streamed = litellm.completion(model=f"openai/{SMOL}", messages=[
        {"role": "user", "content": ASK}], max_tokens=20, stream=True, **common)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in streamed)
    text = litellm.text_completion(model=f"text-completion-openai/{SMOL}",
                                   prompt="The capital of France is", max_tokens=5, **common)
    assert "Paris" in text.choices[0].text


@pytest.mark.timeout(300)
def test_vllm_bench_serve_on_completions(stack: LocalStack, api_key: str, tiny_model: Path,
                                         tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", BENCH, "--backend", "openai", "--base-url", stack.base_url,
         "--endpoint", "/v1/completions", "--model", TINY_A,
         "--tokenizer", str(tiny_model), "--dataset-name", "random", "--random-input-len", "32",
         "--random-output-len", "8", "--num-prompts", "6", "--max-concurrency", "3",
         "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"],
        env=os.environ | {"OPENAI_API_KEY": api_key}, capture_output=True, text=True,
        timeout=280)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["total_output_tokens"] == 6 * 8
