"""A fast engine stand-in for the ingress-capacity benchmark: it streams ``max_tokens``
one-token chunks in vLLM's ``chat.completion.chunk`` shape, one every ``STAND_IN_ITL_MS``,
with no model behind it, so the cost measured is the serving path's alone (as on a GPU
node, where the engine's compute is not on these cores). Not a product engine: the
benchmark injects it through ``LocalStack(engine_cls=...)``."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from cluster.config.catalog import ModelSpec
from cluster.serving.engine import EngineResult
from cluster.serving.messages import EngineCall


class StandInEngine:
    def __init__(self, spec: ModelSpec, model_path: str = "") -> None:
        self.spec = spec
        self.max_model_len = spec.engine.max_model_len
        self.itl_s = float(os.environ.get("STAND_IN_ITL_MS", "10")) / 1000
        self.unfinished = 0

    async def start(self) -> None:
        return None

    async def check_health(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    def unfinished_requests(self) -> int:
        return self.unfinished

    async def generate(self, call: EngineCall) -> EngineResult:
        payload = call.payload
        n = int(payload.get("max_completion_tokens") or payload.get("max_tokens") or 16)
        prompt = sum(len(str(m.get("content", ""))) // 4 + 4 for m in payload["messages"])
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        head = {"id": f"chatcmpl-{time.monotonic_ns()}", "created": int(time.time()),
                "model": self.spec.id}
        if not payload.get("stream"):
            return head | {"object": "chat.completion", "usage": usage, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": "x " * n},
                "finish_reason": "length"}]}
        return self._events(head | {"object": "chat.completion.chunk"}, n, usage)

    async def _events(self, head: dict[str, Any], n: int, usage: dict[str, int]
                      ) -> AsyncIterator[str]:
        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {json.dumps(head | {'choices': choices} | extra)}\n\n"

        self.unfinished += 1
        try:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                          "finish_reason": None}])
            for i in range(n):
                await asyncio.sleep(self.itl_s)
                last = i == n - 1
                yield event([{"index": 0, "delta": {"content": "x "},
                              "finish_reason": "length" if last else None}])
            yield event([], usage=usage)
            yield "data: [DONE]\n\n"
        finally:
            self.unfinished -= 1
