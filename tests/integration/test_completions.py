"""`/v1/completions` and `n` through the real stack and vLLM, with the openai SDK (sync and
async): shapes, streaming, pricing, the per-model bounds and the refusals."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings

from cluster.tools.stack import LocalStack
from tests.integration.conftest import SMOL, TINY_A
from tests.support.request_fuzz import Drawn, check, requests


def cost_of(usage: openai.types.CompletionUsage, price_in: float, price_out: float) -> float:
    return (usage.prompt_tokens * price_in + usage.completion_tokens * price_out) / 1e6


def test_a_completion_continues_the_prompt(sdk: openai.OpenAI) -> None:
    done = sdk.completions.create(model=SMOL, prompt="The capital of France is",
                                  temperature=0, max_tokens=5)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert "Paris" in done.choices[0].text
    assert done.choices[0].finish_reason == "length"
    usage = done.usage
    assert usage is not None and usage.completion_tokens == 5
    assert usage.model_extra and usage.model_extra["estimated_cost"] == pytest.approx(
        cost_of(usage, 0.02, 0.04))


def test_a_streamed_completion_has_usage_and_done(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={
        "model": TINY_A, "prompt": "one two three", "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert all("prompt_token_ids" not in ch for c in chunks for ch in c["choices"])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 6
    assert usage["estimated_cost"] == pytest.approx(
        (usage["prompt_tokens"] * 1.5 + 6 * 3.0) / 1e6)


def test_n_and_a_prompt_list_are_all_generated_and_priced(sdk: openai.OpenAI) -> None:
    done = sdk.completions.create(model=TINY_A, prompt=["a b", "c d"], n=2, max_tokens=3,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in done.choices) == [0, 1, 2, 3]
    assert done.usage is not None and done.usage.completion_tokens == 4 * 3
    chat = sdk.chat.completions.create(model=TINY_A, n=3, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert chat.usage is not None and chat.usage.completion_tokens == 3 * 4


def test_n_streams_every_choice(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(model=TINY_A, n=2, max_tokens=4, stream=True,
                                         messages=[{"role": "user", "content": "hi"}],
                                         extra_body={"ignore_eos": True})
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_refusals_name_the_field(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as too_many:
        sdk.completions.create(model=TINY_A, prompt="x", n=9)  # the model allows 8
    assert isinstance(too_many.value.body, dict) and too_many.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.completions.create(model=TINY_A, prompt="word " * 1100, max_tokens=4)
    assert "context length" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as suffix:
        sdk.completions.create(model=TINY_A, prompt="x", suffix="y")
    assert "suffix" in suffix.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="nobody/none", prompt="x")


def test_max_tokens_zero_counts_the_prompt_only(sdk: openai.OpenAI) -> None:
    done = sdk.completions.create(model=TINY_A, prompt="one two three", max_tokens=0)
    assert done.choices[0].text == "" and done.usage is not None
    assert done.usage.completion_tokens == 0 and done.usage.prompt_tokens > 0


def test_the_async_sdk_runs_chat_and_completions_concurrently(stack: LocalStack,
                                                              api_key: str) -> None:
    async def run() -> tuple[list[str], list[str], int]:
        client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key,
                                    max_retries=0, timeout=120)
        async with client:
            chats = [client.chat.completions.create(
                model=TINY_A, max_tokens=3, messages=[{"role": "user", "content": f"{i}"}])
                for i in range(3)]
            texts = [client.completions.create(model=TINY_A, prompt=f"{i}", max_tokens=3)
                     for i in range(3)]
            streamed = await client.completions.create(
                model=TINY_A, prompt="x", max_tokens=3, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = [c async for c in streamed]
            done = await asyncio.gather(*chats, *texts)
        parts = [c.choices[0].text for c in chunks if c.choices]
        used = [c.usage.completion_tokens for c in chunks if c.usage is not None]
        return [d.object for d in done], parts, used[-1]

    objects, parts, completion_tokens = asyncio.run(run())
    assert objects == ["chat.completion"] * 3 + ["text_completion"] * 3
    # vLLM merges the deltas a slow reader has not taken yet (as its own server does), so
    # three tokens arrive in one to three chunks; the usage chunk counts them.
    assert completion_tokens == 3 and 1 <= len(parts) <= 3 and "".join(parts)


def test_models_list_the_endpoints(http: httpx.Client) -> None:
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert cards[SMOL]["endpoints"] == ["/v1/chat/completions", "/v1/completions"]
    assert cards[SMOL]["max_choices"] == 8


@given(drawn=requests(TINY_A))
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_boundary_combinations_through_vllm(drawn: Drawn, http: httpx.Client) -> None:
    """vLLM accepts what the API documents, and the API refuses the rest itself."""
    r = http.post(drawn.path, json=drawn.body)
    check(drawn, r.status_code, r.json() if drawn.bad else None)
    if drawn.status == 200 and drawn.body.get("stream"):
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
