"""A fake engine behind the ``ChatEngine`` interface, for unit tests of the layers above it.

It echoes the last user message word by word, in vLLM's response and chunk shapes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from cluster.config.catalog import ModelSpec
from cluster.errors import RateLimitState
from cluster.gate.contract import Admission, OpenGate, Outcome, Usage
from cluster.serving.coalesce import close
from cluster.serving.engine import ChatResult, RequestRejected
from cluster.serving.messages import Rejected
from cluster.serving.replica import ReplicaCore


class FakeEngine:
    max_model_len = 64

    def __init__(self, spec: ModelSpec, model_path: str = "") -> None:
        self.spec = spec
        self.aborted = 0
        self.delay_s = 0.0
        self.fail_after: int | None = None  # raise mid-stream after this many words
        self.last_payload: dict[str, Any] = {}

    async def start(self) -> None:
        return None

    async def check_health(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    def unfinished_requests(self) -> int:
        return 0

    def _plan(self, payload: dict[str, Any]) -> tuple[int, list[str], str]:
        user = [m for m in payload["messages"] if m["role"] == "user"]
        text = user[-1]["content"] if user else ""
        if isinstance(text, list):
            text = " ".join(p["text"] for p in text)
        words = text.split() or ["ok"]
        prompt = sum(len(str(m.get("content", "")).split()) + 2 for m in payload["messages"])
        limit = payload.get("max_tokens")
        if prompt + (limit or 0) > self.max_model_len:
            raise RequestRejected(Rejected(
                400, f"This model's maximum context length is {self.max_model_len} tokens.",
                "messages"))
        finish = "stop"
        if limit is not None and limit < len(words):
            words, finish = words[:limit], "length"
        return prompt, words, finish

    async def chat(self, payload: dict[str, Any]) -> ChatResult:
        self.last_payload = payload
        prompt, words, finish = self._plan(payload)
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words),
                 "total_tokens": prompt + len(words)}
        head = {"id": "chatcmpl-fake", "created": int(time.time()), "model": self.spec.id}
        if not payload.get("stream"):
            return head | {"object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                 "finish_reason": finish}]}
        return self._events(head | {"object": "chat.completion.chunk"}, words, finish, usage,
                            payload)

    async def _events(self, head: dict[str, Any], words: list[str], finish: str,
                      usage: dict[str, int], payload: dict[str, Any]) -> AsyncIterator[str]:
        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {json.dumps(head | {'choices': choices} | extra)}\n\n"

        try:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                          "finish_reason": None}])
            for i, word in enumerate(words):
                if self.fail_after is not None and i == self.fail_after:
                    yield 'data: {"error": {"message": "engine died", "code": 500}}\n\n'
                    yield "data: [DONE]\n\n"
                    return
                await asyncio.sleep(self.delay_s)
                yield event([{"index": 0, "delta": {"content": (" " if i else "") + word},
                              "finish_reason": None}])
            yield event([{"index": 0, "delta": {}, "finish_reason": finish}])
            if (payload.get("stream_options") or {}).get("include_usage"):
                yield event([], usage=usage)
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted += 1
            raise


class LocalRouter:
    """Routes to in-process replicas (ReplicaCore + FakeEngine), no Serve."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self.replicas = {s.id: ReplicaCore(s, FakeEngine(s)) for s in specs}

    def engine(self, model: str) -> FakeEngine:
        engine = self.replicas[model].engine
        assert isinstance(engine, FakeEngine)
        return engine

    async def chat(self, model: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.replicas[model].chat(payload)

    async def stream(self, model: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        items = self.replicas[model].stream(payload)
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
        self.rejections: list[tuple[str | None, str | None, str]] = []

    async def record_rejection(self, *, api_key: str | None, user: str | None,
                               model: str, reason: str) -> None:
        self.rejections.append((api_key, user, reason))

    async def admit(self, *, api_key: str | None, user: str | None, model: ModelSpec,
                    reserve_tokens: int) -> Admission:
        admission = await super().admit(api_key=api_key, user=user, model=model,
                                        reserve_tokens=reserve_tokens)
        admission.rate = RateLimitState(limit_requests=100, remaining_requests=99)
        return admission

    async def settle(self, admission: Admission, usage: Usage, outcome: Outcome) -> None:
        self.settled.append((admission, usage, outcome))
