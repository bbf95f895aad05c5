"""`/v1/completions` and `n` over the fake engine: the same request life as chat (checked,
admitted, priced, streamed, settled once), the endpoint's own shapes, the per-model bounds."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cluster.api.ingress import create_app
from cluster.gate.contract import Outcome
from cluster.serving.service import InferenceService
from tests.fakes import LocalRouter, RecordingGate, TinyTpmGate, spec

MODEL = "acme/echo-1"
CHAT_ONLY = "acme/chat-only"


@pytest.fixture
def gate() -> RecordingGate:
    return RecordingGate()


@pytest.fixture
async def client(gate: RecordingGate) -> AsyncIterator[httpx.AsyncClient]:
    specs = [spec(MODEL, 100.0, 200.0, max_choices=4),
             spec(CHAT_ONLY, 1.0, 2.0, endpoints=["chat"])]
    service = InferenceService(specs, LocalRouter(specs), gate)
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "once upon a time"} | fields


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]} | fields


def events(text: str) -> list[dict[str, Any]]:
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def cost(usage: dict[str, int]) -> float:
    return (usage["prompt_tokens"] * 100.0 + usage["completion_tokens"] * 200.0) / 1e6


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/openai/completions"])
async def test_a_completion_is_priced_and_settled_once(client: httpx.AsyncClient,
                                                       gate: RecordingGate, path: str) -> None:
    r = await client.post(path, json=completion())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "once upon a time", "logprobs": None,
                                "finish_reason": "stop"}]
    assert body["usage"]["estimated_cost"] == pytest.approx(cost(body["usage"]))
    [(admission, usage, outcome)] = gate.settled
    assert outcome is Outcome.ok and usage.completion_tokens == 4
    # Reserved: the prompt's estimate plus OpenAI's default of 16 completion tokens, and
    # their worst-case cost for the budgets; the ledger learns the endpoint and status.
    prompt_estimate = len("once upon a time") // 3 + 8
    assert admission.reserved_tokens == prompt_estimate + 16
    assert admission.reserved_cost == pytest.approx((prompt_estimate * 100 + 16 * 200) / 1e6)
    assert admission.endpoint == "completion"
    [ending] = gate.endings
    assert ending.status == 200 and ending.latency_ms >= 0


async def test_a_streamed_completion_ends_with_its_priced_usage(client: httpx.AsyncClient,
                                                                gate: RecordingGate) -> None:
    r = await client.post("/v1/completions", json=completion(
        stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200, r.text
    chunks = events(r.text)
    assert {c["object"] for c in chunks} == {"text_completion"}
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "once upon a time"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["estimated_cost"] == pytest.approx(cost(usage))
    [(_, settled, outcome)] = gate.settled
    assert outcome is Outcome.ok and settled.completion_tokens == usage["completion_tokens"]


async def test_n_choices_are_counted_priced_and_reserved(client: httpx.AsyncClient,
                                                        gate: RecordingGate) -> None:
    r = await client.post("/v1/chat/completions", json=chat(n=3, max_tokens=5))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 3 * 2
    assert body["usage"]["estimated_cost"] == pytest.approx(cost(body["usage"]))
    [(admission, usage, _)] = gate.settled
    assert usage.completion_tokens == 6 and admission.reserved_tokens >= 3 * 5


async def test_n_streams_with_each_choice_indexed(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(n=2, stream=True))
    texts: dict[int, str] = {}
    for c in events(r.text):
        for choice in c["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + \
                (choice["delta"].get("content") or "")
    assert texts == {0: "hello there", 1: "hello there"}


async def test_prompts_times_n_are_the_choices(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=completion(prompt=["a b", "c d"], n=2))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4
    r = await client.post("/v1/completions", json=completion(prompt=["a", "b", "c"], n=2))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", chat(n=5)),
    ("/v1/completions", completion(n=5)),
])
async def test_more_choices_than_the_model_allows_is_a_400_before_admission(
        client: httpx.AsyncClient, gate: RecordingGate, path: str, body: dict[str, Any]
) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "n" and "at most 4" in error["message"]
    assert gate.settled == [] and [reason for *_, reason in gate.rejections] == [
        "invalid_request"]


async def test_an_endpoint_the_model_does_not_serve_is_a_404(client: httpx.AsyncClient,
                                                             gate: RecordingGate) -> None:
    r = await client.post("/v1/completions", json=completion(model=CHAT_ONLY))
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and "/v1/chat/completions" in error["message"]
    assert gate.settled == []
    ok = await client.post("/v1/chat/completions", json=chat(model=CHAT_ONLY))
    assert ok.status_code == 200


async def test_the_model_list_names_each_models_endpoints(client: httpx.AsyncClient) -> None:
    cards = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
    assert cards[MODEL]["endpoints"] == ["/v1/chat/completions", "/v1/completions"]
    assert cards[CHAT_ONLY]["endpoints"] == ["/v1/chat/completions"]
    assert cards[MODEL]["max_choices"] == 4


@pytest.mark.parametrize(("fields", "param"), [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"min_tokens": 17}, "min_tokens"),  # above the default max_tokens of 16
    ({"messages": [{"role": "user", "content": "x"}]}, "messages"),
    ({"stream_options": {"include_usage": True}}, None),
])
async def test_bad_completion_fields_are_400s_naming_them(client: httpx.AsyncClient,
                                                          fields: dict[str, Any],
                                                          param: str | None) -> None:
    r = await client.post("/v1/completions", json=completion(**fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None if param is None else error["param"].startswith(param)


async def test_token_id_prompts_are_accepted(client: httpx.AsyncClient) -> None:
    for prompt in ([1, 2, 3], [[1, 2], [3, 4]]):
        r = await client.post("/v1/completions", json=completion(prompt=prompt))
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("body", [completion(prompt=""), completion(prompt=["a", ""]),
                                  completion(n=2, temperature=0), chat(n=2, temperature=0)])
async def test_what_the_engine_would_refuse_is_refused_before_admission(
        client: httpx.AsyncClient, gate: RecordingGate, body: dict[str, Any]) -> None:
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert gate.settled == []


async def test_a_completion_failing_mid_stream_is_an_sse_error_settled_as_such() -> None:
    gate = RecordingGate()
    specs = [spec(MODEL, 1.0, 2.0)]
    router = LocalRouter(specs)
    router.engine(MODEL).fail_after = 1
    app = create_app(InferenceService(specs, router, gate))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        r = await c.post("/v1/completions", json=completion(stream=True))
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(data[-2])["error"]["message"] == "engine died" and data[-1] == "[DONE]"
    assert [o for *_, o in gate.settled] == [Outcome.error]
    assert gate.endings[0].status == 200  # what the client got: the stream had begun


async def test_a_request_the_engine_refuses_settles_with_the_status_the_client_got(
        client: httpx.AsyncClient, gate: RecordingGate) -> None:
    r = await client.post("/v1/completions", json=completion(prompt="w " * 70, max_tokens=40))
    assert r.status_code == 400, r.text
    [(_, usage, outcome)] = gate.settled
    assert (outcome, gate.endings[0].status, usage.estimated_cost) == (Outcome.error, 400, 0)


async def test_a_completion_left_before_its_headers_settles_as_disconnected() -> None:
    import asyncio

    from cluster.api.protocol import CompletionRequest
    from cluster.api.sse import stream_response
    from cluster.serving.service import InferenceStream

    gate = RecordingGate()
    specs = [spec(MODEL, 1.0, 2.0)]
    router = LocalRouter(specs)
    router.engine(MODEL).delay_s = 0.05
    service = InferenceService(specs, router, gate)
    stream = await service.create(CompletionRequest.model_validate(completion(stream=True)),
                                  None)
    assert isinstance(stream, InferenceStream)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(5)  # the client is already gone

    scope = {"type": "http", "method": "POST", "headers": []}
    await asyncio.wait_for(stream_response(stream)(scope, receive, send), 2)  # type: ignore[arg-type]
    assert [o for *_, o in gate.settled] == [Outcome.disconnected]
    assert router.replicas[MODEL].active_streams == 0


async def test_a_prompt_past_the_context_is_a_400_even_past_a_tpm_limit() -> None:
    specs = [spec(MODEL, 1.0, 2.0)]
    service = InferenceService(specs, LocalRouter(specs), TinyTpmGate())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)),
                                 base_url="http://t") as c:
        too_long = await c.post("/v1/completions", json=completion(prompt="w " * 70))
        fits = await c.post("/v1/completions", json=completion())
    assert too_long.status_code == 400, too_long.text
    assert fits.status_code == 429 and "Request too large" in fits.json()["error"]["message"]


async def test_cached_prompt_tokens_are_shown_priced_lower_and_settled() -> None:
    gate = RecordingGate()
    specs = [spec(MODEL, 100.0, 200.0, pricing={"input_per_million": 100.0,
                                                "output_per_million": 200.0,
                                                "cached_input_per_million": 10.0})]
    router = LocalRouter(specs)
    router.engine(MODEL).cached_tokens = 2
    app = create_app(InferenceService(specs, router, gate))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        plain = (await c.post("/v1/completions", json=completion())).json()["usage"]
        streamed = events((await c.post("/v1/chat/completions", json=chat(
            stream=True, stream_options={"include_usage": True}))).text)[-1]["usage"]
    for usage in (plain, streamed):
        assert usage["prompt_tokens_details"] == {"cached_tokens": 2}
        uncached = usage["prompt_tokens"] - 2
        assert usage["estimated_cost"] == pytest.approx(
            (uncached * 100 + 2 * 10 + usage["completion_tokens"] * 200) / 1e6)
    assert [u.cached_tokens for _, u, _ in gate.settled] == [2, 2]
