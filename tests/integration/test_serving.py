"""The serving path end to end: openai SDK -> Serve proxy -> ingress -> replica -> vLLM."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from ray import serve

from cluster.config.serve_options import APP_NAME
from cluster.tools.stack import LocalStack
from tests.integration.conftest import SMOL, TINY_A, TINY_B

HELLO = [{"role": "user", "content": "Hello! Tell me a long story about a cat."}]
SDK_FIELDS = {"temperature", "top_p", "presence_penalty", "frequency_penalty", "seed",
              "max_tokens"}


def field_kwargs(field: str, value: float) -> dict[str, object]:
    """The SDK names the OpenAI fields; the others (min_p, top_k...) go in extra_body."""
    return {field: value} if field in SDK_FIELDS else {"extra_body": {field: value}}


def test_smollm2_answers_the_capital_of_france(sdk: openai.OpenAI) -> None:
    done = sdk.chat.completions.create(
        model=SMOL, temperature=0, max_tokens=30,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in (done.choices[0].message.content or "")
    assert done.id.startswith("chatcmpl-") and done.model == SMOL
    usage = done.usage
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + \
        usage.completion_tokens
    cost = usage.model_extra["estimated_cost"] if usage.model_extra else None
    assert cost == pytest.approx((usage.prompt_tokens * 0.02 + usage.completion_tokens * 0.04)
                                 / 1e6)


def test_streaming_with_usage_and_cost(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=SMOL, temperature=0, max_tokens=30, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.model_extra and usage.model_extra["estimated_cost"] == pytest.approx(
        (usage.prompt_tokens * 0.02 + usage.completion_tokens * 0.04) / 1e6)


def test_raw_sse_ends_with_done_and_has_no_usage_unless_asked(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={
        "model": TINY_A, "messages": HELLO, "max_tokens": 5, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c or c["usage"] is None for c in chunks)
    assert all(set(c) <= {"id", "object", "created", "model", "choices", "system_fingerprint"}
               for c in chunks)  # OpenAI's chunk fields, no vLLM-internal nulls
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_max_tokens_one_gives_length(sdk: openai.OpenAI) -> None:
    done = sdk.chat.completions.create(model=TINY_A, messages=HELLO, max_tokens=1)
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 1


def test_max_tokens_zero_generates_nothing(sdk: openai.OpenAI) -> None:
    done = sdk.chat.completions.create(model=TINY_A, messages=HELLO, max_tokens=0)
    assert done.choices[0].message.content == ""
    assert done.usage is not None and done.usage.completion_tokens == 0
    assert done.usage.prompt_tokens > 0


def test_stop_string_cuts_the_output(sdk: openai.OpenAI) -> None:
    ask = {"model": SMOL, "temperature": 0, "max_tokens": 40, "messages": [
        {"role": "user", "content": "List the days of the week, separated by commas."}]}
    full = sdk.chat.completions.create(**ask).choices[0].message.content or ""
    words = full.split()
    assert len(words) >= 4, full
    stop = words[len(words) // 2]
    cut = sdk.chat.completions.create(**ask, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]


def test_same_seed_same_text(sdk: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return sdk.chat.completions.create(
            model=TINY_A, messages=HELLO, max_tokens=12, temperature=1.0, seed=seed,
        ).choices[0].message.content or ""

    assert sample(42) == sample(42)


@pytest.mark.parametrize("field, value", [
    ("temperature", 0), ("temperature", 2), ("top_p", 1), ("min_p", 1), ("top_k", 999),
    ("presence_penalty", -2), ("frequency_penalty", 2), ("repetition_penalty", 0.01),
    ("repetition_penalty", 5), ("seed", 2**63 - 1), ("seed", 0),
])
def test_boundary_values_reach_vllm(sdk: openai.OpenAI, field: str, value: float) -> None:
    done = sdk.chat.completions.create(model=TINY_A, messages=HELLO, max_tokens=2,
                                       **field_kwargs(field, value))  # type: ignore[arg-type]
    assert done.usage is not None and done.usage.completion_tokens >= 1


@pytest.mark.parametrize("field, value", [
    ("temperature", 2.01), ("top_p", 0), ("min_p", 1.01), ("top_k", 1000),
    ("presence_penalty", -2.01), ("frequency_penalty", 2.01), ("repetition_penalty", 0.009),
    ("seed", 2**63), ("max_tokens", 1_000_001),
])
def test_one_past_the_range_is_400(sdk: openai.OpenAI, field: str, value: float) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=TINY_A, messages=HELLO,
                                    **field_kwargs(field, value))  # type: ignore[arg-type]
    assert err.value.status_code == 400
    assert isinstance(err.value.body, dict) and err.value.body["param"] == field


def test_prompt_over_the_context_is_400_naming_the_limit(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=TINY_A, messages=HELLO, max_tokens=5000)
    assert "1024" in str(err.value)


def test_unknown_model_is_404(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        sdk.chat.completions.create(model="nobody/nothing", messages=HELLO)
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "model_not_found"


def test_two_models_route_to_their_own_engines(sdk: openai.OpenAI) -> None:
    for model in (TINY_A, TINY_B, SMOL):
        done = sdk.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
        assert done.model == model  # vLLM names its served model: the engine answered


def test_models_and_health(http: httpx.Client) -> None:
    data = http.get("/v1/models").json()["data"]
    assert {m["id"] for m in data} == {TINY_A, TINY_B, SMOL}
    assert next(m for m in data if m["id"] == SMOL)["context_length"] == 2048
    health = http.get("/health")
    assert health.status_code == 200
    assert health.json()["models"] == {TINY_A: True, TINY_B: True, SMOL: True}


def test_disconnect_aborts_generation_within_a_second(stack: LocalStack,
                                                      api_key: str) -> None:
    from cluster.config.catalog import ModelSpec

    name = next(ModelSpec.model_validate(s.model_dump()).deployment_name
                for s in stack.specs if s.id == TINY_B)
    replica = serve.get_deployment_handle(name, app_name=APP_NAME)
    body = {"model": TINY_B, "messages": HELLO, "max_tokens": 900, "stream": True}
    with httpx.Client(base_url=stack.base_url, timeout=60) as client, client.stream(
            "POST", "/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {api_key}"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(g.startswith("data: ") for g in got)
        assert replica.unfinished_requests.remote().result() == 1
    left = time.monotonic()
    while replica.unfinished_requests.remote().result() and time.monotonic() - left < 5:
        time.sleep(0.05)
    waited = time.monotonic() - left
    assert replica.unfinished_requests.remote().result() == 0
    assert waited < 1.0, f"the engine kept generating {waited:.2f} s after the client left"


def test_a_cpu_engine_gets_the_threads_its_model_file_asks_for(stack: LocalStack) -> None:
    """Ray would give a 0.5-CPU replica OMP_NUM_THREADS=1; the file asks for 2."""
    import psutil

    smol = next(s for s in stack.specs if s.id == SMOL)
    assert smol.engine.cpu_threads == 2
    # Ray titles each replica's process ray::ServeReplica:<app>:<deployment>
    replicas = [p for p in psutil.process_iter(["cmdline"])
                if any(smol.deployment_name in part for part in p.info["cmdline"] or [])]
    assert replicas
    for proc in replicas:
        assert proc.environ().get("OMP_NUM_THREADS") == "2", proc.info["cmdline"]
