"""A fake engine behind the ``Engine`` interface, for unit tests of the layers above it.

It echoes the last user message (a completion: the prompt) word by word, once per choice,
in vLLM's response and chunk shapes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from cluster.config.catalog import Endpoint, ModelSpec
from cluster.errors import RateLimitState, RequestTooLarge
from cluster.gate.contract import Admission, Ending, OpenGate, Outcome, Usage, ending_of
from cluster.serving.coalesce import close
from cluster.serving.engine import EngineResult, RequestRejected
from cluster.serving.messages import EngineCall, Rejected, Reply, StreamItem
from cluster.serving.replica import ReplicaCore


def spec(model_id: str, price_in: float, price_out: float, **fields: Any) -> ModelSpec:
    """A model file for the fake engine: context 64, the given prices per million."""
    return ModelSpec.model_validate({
        "id": model_id, "profile": "local", "source": {"path": "/nowhere"},
        "engine": {"max_model_len": 64},
        "pricing": {"input_per_million": price_in, "output_per_million": price_out}} | fields)


class FakeEngine:
    max_model_len = 64

    def __init__(self, spec: ModelSpec, model_path: str = "") -> None:
        self.spec = spec
        self.aborted = 0
        self.delay_s = 0.0
        self.fail_after: int | None = None  # raise mid-stream after this many words
        self.cached_tokens: int | None = None  # report prompt_tokens_details, as vLLM does
        self.last_payload: dict[str, Any] = {}

    async def start(self) -> None:
        return None

    async def check_health(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    def unfinished_requests(self) -> int:
        return 0

    def _plan(self, call: EngineCall) -> tuple[int, list[str], str]:
        """The prompt's token count, the words to generate per choice, the finish."""
        payload = call.payload
        if call.endpoint is Endpoint.completion:
            prompt_value = payload["prompt"]
            prompts = [prompt_value] if isinstance(prompt_value, str) or (
                prompt_value and isinstance(prompt_value[0], int)) else prompt_value
            text = " ".join(p if isinstance(p, str) else "token " * len(p) for p in prompts)
            prompt = len(text.split()) + 1
        else:
            user = [m for m in payload["messages"] if m["role"] == "user"]
            text = user[-1]["content"] if user else ""
            if isinstance(text, list):
                text = " ".join(p["text"] for p in text)
            prompt = sum(len(str(m.get("content", "")).split()) + 2
                         for m in payload["messages"])
        words = text.split() or ["ok"]
        limit = payload.get("max_completion_tokens", payload.get("max_tokens"))
        if prompt + (limit or 0) > self.max_model_len:
            raise RequestRejected(Rejected(
                400, f"This model's maximum context length is {self.max_model_len} tokens.",
                "messages"))
        finish = "stop"
        if limit is not None and limit < len(words):
            words, finish = words[:limit], "length"
        return prompt, words, finish

    async def generate(self, call: EngineCall) -> EngineResult:
        payload = self.last_payload = call.payload
        prompt, words, finish = self._plan(call)
        n = int(payload.get("n", 1))
        if call.endpoint is Endpoint.completion and not isinstance(payload["prompt"], str) \
                and not isinstance(payload["prompt"][0], int):
            n *= len(payload["prompt"])
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": n * len(words),
                                 "total_tokens": prompt + n * len(words)}
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        chat = call.endpoint is Endpoint.chat
        head = {"id": "chatcmpl-fake" if chat else "cmpl-fake", "created": int(time.time()),
                "model": self.spec.id}
        if not payload.get("stream"):
            return head | {"object": "chat.completion" if chat else "text_completion",
                           "usage": usage, "choices": [
                {"index": i, "finish_reason": finish} | _content(chat, " ".join(words))
                for i in range(n)]}
        kind = "chat.completion.chunk" if chat else "text_completion"
        return self._events(head | {"object": kind}, chat, n, words, finish, usage, payload)

    async def _events(self, head: dict[str, Any], chat: bool, n: int, words: list[str],
                      finish: str, usage: dict[str, int], payload: dict[str, Any],
                      ) -> AsyncIterator[str]:
        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {json.dumps(head | {'choices': choices} | extra)}\n\n"

        def delta(text: str, i: int, done: str | None = None) -> dict[str, Any]:
            return {"index": i, "finish_reason": done} | _delta(chat, text)

        try:
            if chat:
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None} for i in range(n)])
            for w, word in enumerate(words):
                if self.fail_after is not None and w == self.fail_after:
                    yield 'data: {"error": {"message": "engine died", "code": 500}}\n\n'
                    yield "data: [DONE]\n\n"
                    return
                await asyncio.sleep(self.delay_s)
                for i in range(n):
                    yield event([delta((" " if w else "") + word, i)])
            for i in range(n):
                yield event([delta("", i, finish)])
            if (payload.get("stream_options") or {}).get("include_usage"):
                yield event([], usage=usage)
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted += 1
            raise


def _content(chat: bool, text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}} if chat else {
        "text": text, "logprobs": None}


def _delta(chat: bool, text: str) -> dict[str, Any]:
    if not chat:
        return {"text": text, "logprobs": None}
    return {"delta": {"content": text} if text else {}}


class LocalRouter:
    """Routes to in-process replicas (ReplicaCore + FakeEngine), no Serve."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self.replicas = {s.id: ReplicaCore(s, FakeEngine(s)) for s in specs}

    def engine(self, model: str) -> FakeEngine:
        engine = self.replicas[model].engine
        assert isinstance(engine, FakeEngine)
        return engine

    async def generate(self, model: str, call: EngineCall) -> Reply:
        return await self.replicas[model].generate(call)

    async def stream(self, model: str, call: EngineCall) -> AsyncIterator[StreamItem]:
        items = self.replicas[model].stream(call)
        try:
            async for item in items:
                yield item
        finally:  # closed now, as a Serve handle's stream is cancelled
            await close(items)

    async def ready(self, model: str) -> bool:
        return model in self.replicas


class RecordingGate(OpenGate):
    """Admits everything and records settlements, to check each request settles once."""

    def __init__(self) -> None:
        self.settled: list[tuple[Admission, Usage, Outcome]] = []
        self.endings: list[Ending] = []  # of the settlements, in the same order
        self.rejections: list[tuple[str | None, str | None, str]] = []

    async def record_rejection(self, *, api_key: str | None, user: str | None,
                               model: str, reason: str) -> None:
        self.rejections.append((api_key, user, reason))

    async def admit(self, *, api_key: str | None, user: str | None, model: ModelSpec,
                    reserve_tokens: int, reserve_cost: float = 0.0,
                    endpoint: str = "chat") -> Admission:
        admission = await super().admit(api_key=api_key, user=user, model=model,
                                        reserve_tokens=reserve_tokens,
                                        reserve_cost=reserve_cost, endpoint=endpoint)
        admission.rate = RateLimitState(limit_requests=100, remaining_requests=99)
        return admission

    async def settle(self, admission: Admission, usage: Usage, ending: Ending | Outcome
                     ) -> None:
        end = ending_of(ending)
        self.settled.append((admission, usage, end.outcome))
        self.endings.append(end)


class TinyTpmGate(RecordingGate):
    """A key whose TPM is below every request: the gate says "too large" to all."""

    async def admit(self, *, api_key: str | None, user: str | None, model: ModelSpec,
                    reserve_tokens: int, reserve_cost: float = 0.0,
                    endpoint: str = "chat") -> Admission:
        raise RequestTooLarge(f"Request too large for tokens per minute (TPM): Limit 1, "
                              f"Requested {reserve_tokens}.")
