"""The engine a model replica owns: vLLM's AsyncLLM behind vLLM's own OpenAI chat layer.

Templating, tool-call parsing, sampling-parameter checks and the OpenAI response and
``chat.completion.chunk`` shapes all come from vLLM (``OpenAIServingChat``), so they match
vLLM's server. This module knows nothing of HTTP, Ray or Redis; :class:`ChatEngine` is the
interface the replica needs, so tests can inject another engine.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from cluster.config.catalog import ModelSpec
from cluster.serving.messages import Rejected

if TYPE_CHECKING:
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.v1.engine.async_llm import AsyncLLM

ChatResult = dict[str, Any] | AsyncIterator[str]


class RequestRejected(Exception):
    """The engine refused the request (bad input for this model, e.g. too long)."""

    def __init__(self, rejected: Rejected) -> None:
        super().__init__(rejected.message)
        self.rejected = rejected


def _rejected(error: Any) -> RequestRejected:
    """vLLM's ``ErrorResponse`` as the replica's message."""
    e = error.error
    return RequestRejected(Rejected(int(e.code), str(e.message), e.param, str(e.type or "")))


class ChatEngine(Protocol):
    """What a replica needs from an engine. ``chat`` returns the response body, or for
    ``stream: true`` an async iterator of SSE lines (``data: {...}\\n\\n``); it raises
    :class:`RequestRejected` for a request the engine refuses."""

    max_model_len: int

    async def start(self) -> None: ...

    async def chat(self, payload: dict[str, Any]) -> ChatResult: ...

    async def check_health(self) -> None: ...

    def unfinished_requests(self) -> int: ...

    async def shutdown(self) -> None: ...


# CPU-only defaults that make vLLM usable on a small machine (measured on 2 cores).
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default asks for most of the node
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def engine_args(spec: ModelSpec, model_path: str) -> dict[str, Any]:
    """`AsyncEngineArgs` keyword arguments from a deployment file."""
    e = spec.engine
    args: dict[str, Any] = {
        "model": model_path,
        "served_model_name": [spec.id],
        "tensor_parallel_size": e.tensor_parallel_size,
        "pipeline_parallel_size": e.pipeline_parallel_size,
        "dtype": e.dtype,
        "max_model_len": e.max_model_len,
        "enforce_eager": e.enforce_eager,
        "enable_prefix_caching": e.enable_prefix_caching,
        "max_num_seqs": e.max_num_seqs,
        "disable_log_stats": False,
    }
    if e.quantization:
        args["quantization"] = e.quantization
    if spec.resources.num_gpus:
        args["gpu_memory_utilization"] = e.gpu_memory_utilization
    return args | e.extra


class VLLMChatEngine:
    """vLLM ``AsyncLLM`` + ``OpenAIServingChat`` for one model (pinned to vLLM 0.32)."""

    def __init__(self, spec: ModelSpec, model_path: str) -> None:
        self.spec = spec
        self.model_path = model_path
        self.max_model_len = spec.engine.max_model_len
        self._llm: AsyncLLM | None = None
        self._chat: OpenAIServingChat | None = None

    async def start(self) -> None:
        if not self.spec.resources.num_gpus:
            for k, v in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(k, v)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**engine_args(self.spec, self.model_path)))
        self.max_model_len = self._llm.model_config.max_model_len
        self._chat = self._build_chat_layer(self._llm)

    def _build_chat_layer(self, llm: AsyncLLM) -> OpenAIServingChat:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.models.serving import BaseModelPath, OpenAIServingModels
        from vllm.renderers.online_renderer import OnlineRenderer

        e = self.spec.engine
        tools: dict[str, Any] = {"enable_auto_tools": e.tool_call_parser is not None,
                 "tool_parser": e.tool_call_parser}
        common: dict[str, Any] = {"request_logger": None, "chat_template": e.chat_template,
                                  "chat_template_content_format": "auto"}
        models = OpenAIServingModels(
            engine_client=llm,
            base_model_paths=[BaseModelPath(name=self.spec.id, model_path=self.model_path)])
        renderer = OnlineRenderer(model_config=llm.model_config, renderer=llm.renderer,
                                  **common, **tools)
        renderer.warmup()
        return OpenAIServingChat(llm, models, "assistant", online_renderer=renderer,
                                 **common, **tools)

    async def chat(self, payload: dict[str, Any]) -> ChatResult:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import (
            create_error_response,
        )

        assert self._chat is not None, "engine not started"
        try:
            request = ChatCompletionRequest.model_validate(payload)
            if request.max_tokens == 0 or request.max_completion_tokens == 0:
                return await self._zero_tokens(request)
            result = await self._chat.create_chat_completion(request)
        except Exception as e:  # vLLM 0.32 raises on a bad request
            result = create_error_response(e)
        if isinstance(result, ErrorResponse):
            raise _rejected(result)
        if isinstance(result, AsyncIterator):
            return result
        return result.model_dump(exclude_none=True)

    async def _zero_tokens(self, request: Any) -> ChatResult:
        """`max_tokens: 0` (allowed by the API) asks for no generation: vLLM's sampler
        refuses 0, so render the prompt only, to count its tokens, and answer at once."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        assert self._chat is not None
        rendered = await self._chat.render_chat_request(request)
        if isinstance(rendered, ErrorResponse):
            raise _rejected(rendered)
        _, inputs = rendered
        prompt_tokens = self._chat._extract_prompt_len(inputs[0])
        return _empty_completion(self.spec.id, prompt_tokens, bool(request.stream))

    async def check_health(self) -> None:
        assert self._llm is not None, "engine not started"
        await self._llm.check_health()

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (running or queued); 0 after aborts."""
        assert self._llm is not None, "engine not started"
        return int(self._llm.output_processor.get_num_unfinished_requests())

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


def _empty_completion(model: str, prompt_tokens: int, stream: bool) -> ChatResult:
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
             "total_tokens": prompt_tokens}
    if not stream:
        return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                             "finish_reason": "length"}], "usage": usage}
    import json

    head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}

    async def events() -> AsyncIterator[str]:
        for choices, extra in (
            ([{"index": 0, "delta": {"role": "assistant", "content": ""},
               "finish_reason": None}], {}),
            ([{"index": 0, "delta": {}, "finish_reason": "length"}], {}),
            ([], {"usage": usage}),
        ):
            yield f"data: {json.dumps(head | {'choices': choices} | extra)}\n\n"
        yield "data: [DONE]\n\n"

    return events()
