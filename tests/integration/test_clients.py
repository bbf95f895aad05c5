"""The clients people use, unchanged, against the real stack: the ecosystem's contracts.

LangChain's ``ChatOpenAI`` (invoke, stream, structured output, a tool round trip), the
LiteLLM SDK as a client (chat and text completions, plain and streamed). The openai SDK and
``vllm bench serve`` (chat and completions) are in the other modules. Versions are
pinned in pyproject.toml; if one of these breaks, the test names the client.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel

from cluster.tools.stack import LocalStack
from tests.integration.conftest import SMOL

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
