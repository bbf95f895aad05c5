"""The ingress and the replica logic over a fake engine: protocol, errors, streaming, billing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from cluster.api.errors import status_of
from cluster.api.ingress import create_app
from cluster.api.sse import stream_response
from cluster.config.catalog import ModelSpec
from cluster.errors import QuotaExceeded
from cluster.gate.contract import Admission, Outcome
from cluster.serving.service import InferenceService, InferenceStream
from tests.fakes import LocalRouter, RecordingGate, TinyTpmGate, spec

MODEL = "acme/echo-1"
OTHER = "acme/echo-2"


@pytest.fixture
def gate() -> RecordingGate:
    return RecordingGate()


@pytest.fixture
def router() -> LocalRouter:
    return LocalRouter([spec(MODEL, 100.0, 200.0), spec(OTHER, 1.0, 2.0)])


@pytest.fixture
async def client(router: LocalRouter, gate: RecordingGate) -> AsyncIterator[httpx.AsyncClient]:
    service = InferenceService(list(s.spec for s in router.replicas.values()), router, gate)
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there world"}]} \
        | fields


async def test_plain_completion_has_openai_shape_and_cost(client: httpx.AsyncClient,
                                                        gate: RecordingGate) -> None:
    r = await client.post("/v1/openai/chat/completions", json=chat())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": "hello there world"}
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    expected = (usage["prompt_tokens"] * 100.0 + usage["completion_tokens"] * 200.0) / 1e6
    assert usage["estimated_cost"] == pytest.approx(expected)
    assert r.headers["x-ratelimit-limit-requests"] == "100"
    [(_, settled, outcome)] = gate.settled
    assert outcome is Outcome.ok and settled.completion_tokens == 3


async def test_both_paths_and_routing_by_model(client: httpx.AsyncClient) -> None:
    for path in ("/v1/chat/completions", "/v1/openai/chat/completions"):
        r = await client.post(path, json=chat(model=OTHER))
        assert r.status_code == 200 and r.json()["model"] == OTHER


async def test_models_list_has_context_and_prices(client: httpx.AsyncClient) -> None:
    for path in ("/v1/models", "/v1/openai/models"):
        data = (await client.get(path)).json()["data"]
        assert {m["id"] for m in data} == {MODEL, OTHER}
        echo = next(m for m in data if m["id"] == MODEL)
        assert echo["context_length"] == 64
        assert echo["pricing"]["input_per_million"] == 100.0


async def test_health_reports_models(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200 and r.json()["models"] == {MODEL: True, OTHER: True}


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


async def test_stream_shape_usage_and_done(client: httpx.AsyncClient,
                                           gate: RecordingGate) -> None:
    r = await client.post("/v1/chat/completions",
                          json=chat(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {"chatcmpl-fake"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "hello there world"
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish[0]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["estimated_cost"] == pytest.approx(
        (usage["prompt_tokens"] * 100 + usage["completion_tokens"] * 200) / 1e6)
    assert gate.settled[0][2] is Outcome.ok


async def test_stream_without_include_usage_still_bills(client: httpx.AsyncClient,
                                                        gate: RecordingGate) -> None:
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all("usage" not in c for c in chunks)
    [(_, usage, outcome)] = gate.settled
    assert outcome is Outcome.ok and usage.completion_tokens == 3 and usage.prompt_tokens > 0


async def test_error_mid_stream_is_an_sse_error_then_done(
        client: httpx.AsyncClient, router: LocalRouter, gate: RecordingGate) -> None:
    router.engine(MODEL).fail_after = 1
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    events = sse_events(r.text)
    assert json.loads(events[-2])["error"]["message"] == "engine died"
    assert events[-1] == "[DONE]"
    assert gate.settled[0][2] is Outcome.error


async def test_engine_refusal_is_400_before_stream(client: httpx.AsyncClient,
                                                   gate: RecordingGate) -> None:
    # 60 fits the context of 64 alone, not with the prompt: the engine refuses it
    r = await client.post("/v1/chat/completions", json=chat(stream=True, max_tokens=60))
    assert r.status_code == 400
    assert "maximum context length is 64" in r.json()["error"]["message"]
    assert gate.settled[0][2] is Outcome.error


async def test_max_tokens_gives_length(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json=chat(max_tokens=1))).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 1


BOUNDARIES: list[tuple[str, Any, Any]] = [
    # field, accepted boundary values, first rejected values
    ("temperature", [0, 2], [-0.01, 2.01]),
    ("top_p", [0.001, 1], [0, 1.01]),
    ("min_p", [0, 1], [-0.1, 1.1]),
    ("top_k", [0, 999], [-1, 1000]),
    ("max_tokens", [0, 1_000_000], [-1, 1_000_001]),
    ("presence_penalty", [-2, 2], [-2.01, 2.01]),
    ("frequency_penalty", [-2, 2], [-2.01, 2.01]),
    ("repetition_penalty", [0.01, 5], [0.009, 5.01]),
    ("seed", [0, 2**63 - 1], [-1, 2**63]),
    ("min_tokens", [0, 3], [-1, 1_000_001]),
    ("priority", [-(2**63), 2**63 - 1], [-(2**63) - 1, 2**63]),
]


@pytest.mark.parametrize(("field", "ok", "bad"), BOUNDARIES)
async def test_ranges(client: httpx.AsyncClient, field: str, ok: list[Any],
                      bad: list[Any]) -> None:
    for value in ok:
        r = await client.post("/v1/chat/completions", json=chat(**{field: value}))
        # max_tokens=1e6 passes validation; the (fake) engine then refuses the context.
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400:
            assert "maximum context length" in r.json()["error"]["message"]
    for value in bad:
        r = await client.post("/v1/chat/completions", json=chat(**{field: value}))
        assert r.status_code == 400, (field, value, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == field


@pytest.mark.parametrize(("payload", "param"), [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].user.content"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
     "messages[0].tool.tool_call_id"),
    (chat(temperature="hot"), "temperature"),
    (chat(stop=[""]), "stop"),
    (chat(user="u" * 257), "user"),
    (chat(tool_choice={"type": "function", "function": {"name": "f"}}), "tool_choice"),
    (chat(stream_options={"include_usage": True}), None),
    (chat(unknown_field=1), "unknown_field"),
    (chat(min_tokens=5, max_tokens=4), "min_tokens"),
    (chat(stop_token_ids=[-1]), "stop_token_ids[0]"),
    (chat(structured_outputs={"choice": ["a"], "regex": "a"}), "structured_outputs"),
    (chat(structured_outputs={"choice": []}), "structured_outputs.choice"),
    (chat(structured_outputs={"unknown": 1}), "structured_outputs.unknown"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
])
async def test_bad_requests_are_400_with_param(client: httpx.AsyncClient,
                                               payload: dict[str, Any],
                                               param: str | None) -> None:
    r = await client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


async def test_vllm_extra_fields_reach_the_engine(client: httpx.AsyncClient,
                                                  router: LocalRouter) -> None:
    extra = {"ignore_eos": True, "min_tokens": 2, "stop_token_ids": [7],
             "skip_special_tokens": False, "include_stop_str_in_output": True,
             "spaces_between_special_tokens": False, "priority": 0,
             "chat_template_kwargs": {"enable_thinking": False},
             "structured_outputs": {"json": {"type": "object"}}}
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=4, **extra))
    assert r.status_code == 200, r.text
    sent = router.engine(MODEL).last_payload
    assert {k: sent[k] for k in extra} == extra  # as given: the engine applies them


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(model="nope/nope"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


async def test_a_completion_budget_beyond_the_context_is_400_before_any_limit(
        client: httpx.AsyncClient, gate: RecordingGate) -> None:
    """An impossible request is answered 400 and reserves nothing, whatever the key's TPM."""
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=64))  # context: 64
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")
    assert "64" in error["message"]
    assert gate.settled == [] and gate.rejections[-1][2] == "context_length_exceeded"
    ok = await client.post("/v1/chat/completions", json=chat(max_tokens=8))
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(("words", "max_tokens", "status", "says"), [
    (70, None, 400, "maximum context length is 64"),  # the prompt alone: the engine says
    (40, 30, 400, "has 42 input tokens and max_tokens 30"),  # prompt + budget: we say
    (3, 8, 429, "Request too large"),  # it fits the model: the limit stands
])
async def test_a_request_the_context_cannot_hold_is_400_even_past_a_tpm_limit(
        router: LocalRouter, words: int, max_tokens: int | None, status: int,
        says: str) -> None:
    service = InferenceService([r.spec for r in router.replicas.values()], router, TinyTpmGate())
    body = {"model": MODEL, "messages": [{"role": "user", "content": "w " * words}]}
    if max_tokens:
        body["max_tokens"] = max_tokens
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)),
                                 base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


async def test_tools_and_multi_part_content_reach_the_engine(
        client: httpx.AsyncClient) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "call it"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "user", "content": "thanks"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = await client.post("/v1/chat/completions",
                          json=chat(messages=messages, tools=tools, tool_choice="auto"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "thanks"


async def test_openai_sdk_against_the_app(router: LocalRouter, gate: RecordingGate) -> None:
    service = InferenceService([r.spec for r in router.replicas.values()], router, gate)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)))
    sdk = openai.AsyncOpenAI(api_key="k", base_url="http://test/v1/openai", http_client=http,
                             max_retries=0)
    done = await sdk.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "a b"}])
    assert done.choices[0].message.content == "a b"
    assert done.usage is not None and done.usage.model_extra
    assert done.usage.model_extra["estimated_cost"] > 0
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a b c"}], stream=True,
        stream_options={"include_usage": True})
    pieces = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == "a b c"
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(model=MODEL, messages=[], temperature=3)
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="x/y", messages=[{"role": "user",
                                                                   "content": "a"}])
    await http.aclose()


async def test_engine_gets_the_seed_defaults_spelled_out(client: httpx.AsyncClient,
                                                        router: LocalRouter) -> None:
    await client.post("/v1/chat/completions", json=chat(top_k=5))
    sent = router.engine(MODEL).last_payload
    assert sent["temperature"] == 1.0 and sent["top_p"] == 1.0 and sent["min_p"] == 0.0
    assert sent["repetition_penalty"] == 1.0 and sent["top_k"] == 5
    assert "seed" not in sent and "max_tokens" not in sent  # unset stays unset


async def test_a_refused_request_is_recorded_with_its_status(router: LocalRouter,
                                                            gate: RecordingGate) -> None:
    from cluster.serving.observer import NullMetrics, RequestRecord

    class Recorder(NullMetrics):
        records: list[RequestRecord] = []

        def finished(self, record: RequestRecord) -> None:
            self.records.append(record)

    metrics = Recorder()
    service = InferenceService([r.spec for r in router.replicas.values()], router, gate, metrics)
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json=chat(max_tokens=60, stream=stream))
            assert r.status_code == 400
    assert [(status_of(m.error), m.outcome) for m in metrics.records if m.error] == \
        [(400, "error")] * 2
    assert [o for _, _, o in gate.settled] == [Outcome.error] * 2


async def test_a_400_counts_against_the_key_and_user(client: httpx.AsyncClient,
                                                    gate: RecordingGate) -> None:
    r = await client.post("/v1/chat/completions", json=chat(temperature=9, user="eve"),
                          headers={"Authorization": "Bearer sk-abc"})
    assert r.status_code == 400
    r = await client.post("/v1/chat/completions", content=b"{oops",
                          headers={"Authorization": "Bearer sk-abc",
                                   "content-type": "application/json"})
    assert r.status_code == 400
    assert gate.rejections == [("sk-abc", "eve", "invalid_value"), ("sk-abc", None, "invalid_json")]
    assert gate.settled == []  # refused before admission: nothing to settle


async def test_a_stream_left_before_its_headers_still_settles(router: LocalRouter,
                                                              gate: RecordingGate) -> None:
    """sse-starlette never starts the body if the client leaves before the headers go out."""
    import asyncio

    from cluster.api.protocol import ChatCompletionRequest
    from cluster.serving.observer import NullMetrics

    class Ongoing(NullMetrics):
        count = 0

        def ongoing(self, model: str, delta: int) -> None:
            self.count += delta

    metrics = Ongoing()
    router.engine(MODEL).delay_s = 0.05
    service = InferenceService([r.spec for r in router.replicas.values()], router, gate, metrics)
    stream = await service.create(
        ChatCompletionRequest.model_validate(chat(stream=True)), None)
    assert isinstance(stream, InferenceStream)
    response = stream_response(stream)
    assert metrics.count == 1

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(5)  # the headers never leave: the client is already gone

    scope = {"type": "http", "method": "POST", "headers": []}
    await asyncio.wait_for(response(scope, receive, send), 2)  # type: ignore[arg-type]
    assert [o for _, _, o in gate.settled] == [Outcome.disconnected]
    assert metrics.count == 0
    assert router.replicas[MODEL].active_streams == 0  # the replica's stream was closed


class RefusingHandle:
    """A Serve handle whose every call fails as Serve's router would fail it."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0
        self.generate = self.stream = self

    def options(self, **_: Any) -> RefusingHandle:
        return self

    def remote(self, call: object) -> RefusingHandle:
        self.calls += 1
        return self

    def __await__(self) -> Any:
        raise self.error
        yield  # a generator, hence awaitable

    def __aiter__(self) -> RefusingHandle:
        return self

    async def __anext__(self) -> dict[str, Any]:
        raise self.error

    def cancel(self) -> None:
        return None


def refusing_app(error: Exception, gate: RecordingGate) -> tuple[Any, RefusingHandle]:
    from cluster.api.ingress import HandleRouter

    handle = RefusingHandle(error)
    router = HandleRouter({MODEL: handle})  # type: ignore[dict-item]
    return create_app(InferenceService([spec(MODEL, 1.0, 1.0)], router, gate)), handle


@pytest.mark.parametrize("stream", [False, True])
async def test_a_full_model_queue_is_a_503_with_retry_after(gate: RecordingGate,
                                                            stream: bool) -> None:
    from ray.serve.exceptions import BackPressureError

    app, _ = refusing_app(BackPressureError(num_queued_requests=8, max_queued_requests=8,
                                            retry_after_s=2.5), gate)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json=chat(stream=stream))
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "model_overloaded"
    assert [o for _, _, o in gate.settled] == [Outcome.error]  # settled once, nothing used
    assert gate.settled[0][1].prompt_tokens == gate.settled[0][1].completion_tokens == 0


async def test_a_dead_replica_is_a_503_the_sdk_retries(gate: RecordingGate) -> None:
    from ray.serve.exceptions import ReplicaUnavailableError

    app, handle = refusing_app(ReplicaUnavailableError("replica-1"), gate)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    sdk = openai.AsyncOpenAI(base_url="http://t/v1", api_key="k", http_client=http,
                             max_retries=1)
    with pytest.raises(openai.InternalServerError) as e:
        await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                   "content": "hi"}])
    assert e.value.status_code == 503 and e.value.code == "model_unavailable"
    assert handle.calls == 2  # retried once, after Retry-After


class SpentGate(RecordingGate):
    """A key whose budget is spent: every admission is 429 insufficient_quota."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def admit(self, *, api_key: str | None, user: str | None, model: ModelSpec,
                    reserve_tokens: int, reserve_cost: float = 0.0,
                    endpoint: str = "chat") -> Admission:
        self.calls += 1
        raise QuotaExceeded("You exceeded your current quota: the daily budget of this API "
                            "key is spent.", retry_after_s=3600)


async def test_the_openai_sdk_does_not_retry_a_spent_budget(router: LocalRouter) -> None:
    gate = SpentGate()
    service = InferenceService([r.spec for r in router.replicas.values()], router, gate)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)))
    sdk = openai.AsyncOpenAI(api_key="k", base_url="http://test/v1", http_client=http,
                             max_retries=3)
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": "a"}])
    assert info.value.code == "insufficient_quota" and info.value.type == "insufficient_quota"
    assert gate.calls == 1  # x-should-retry: false, although a 429 is retried by default
    await http.aclose()
