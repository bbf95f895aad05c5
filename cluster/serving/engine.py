"""The engine a model replica owns: vLLM's AsyncLLM behind vLLM's own OpenAI layers.

Templating, tool-call parsing, sampling-parameter checks and the OpenAI response and chunk
shapes all come from vLLM (``OpenAIServingChat`` for chat, ``OpenAIServingCompletion`` for
completions), so they match vLLM's server. This module knows nothing of HTTP, Ray or Redis;
:class:`Engine` is the interface the replica needs, so tests can inject another engine.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from cluster.config.catalog import Endpoint, ModelSpec
from cluster.serving.messages import EngineCall, Rejected

if TYPE_CHECKING:
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.v1.engine.async_llm import AsyncLLM

EngineResult = dict[str, Any] | AsyncIterator[str]
L = TypeVar("L")


class RequestRejected(Exception):
    """The engine refused the request (bad input for this model, e.g. too long)."""

    def __init__(self, rejected: Rejected) -> None:
        super().__init__(rejected.message)
        self.rejected = rejected


def _rejected(error: Any) -> RequestRejected:
    """vLLM's ``ErrorResponse`` as the replica's message."""
    e = error.error
    return RequestRejected(Rejected(int(e.code), str(e.message), e.param, str(e.type or "")))


class Engine(Protocol):
    """What a replica needs from an engine. ``generate`` returns the response body, or for
    ``stream: true`` an async iterator of SSE lines (``data: {...}\\n\\n``); it raises
    :class:`RequestRejected` for a request the engine refuses."""

    max_model_len: int

    async def start(self) -> None: ...

    async def generate(self, call: EngineCall) -> EngineResult: ...

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


class VLLMEngine:
    """vLLM ``AsyncLLM`` + its OpenAI chat and completion layers for one model (vLLM 0.32)."""

    def __init__(self, spec: ModelSpec, model_path: str) -> None:
        self.spec = spec
        self.model_path = model_path
        self.max_model_len = spec.engine.max_model_len
        self._llm: AsyncLLM | None = None
        self._chat: OpenAIServingChat | None = None
        self._completion: OpenAIServingCompletion | None = None

    async def start(self) -> None:
        if not self.spec.resources.num_gpus:
            for k, v in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(k, v)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**engine_args(self.spec, self.model_path)))
        self.max_model_len = self._llm.model_config.max_model_len
        self._build_openai_layers(self._llm)

    def _build_openai_layers(self, llm: AsyncLLM) -> None:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
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
        if Endpoint.chat in self.spec.endpoints:
            # prompt_tokens_details.cached_tokens (prefix-cache hits), priced per model file
            self._chat = OpenAIServingChat(llm, models, "assistant", online_renderer=renderer,
                                           enable_prompt_tokens_details=True,
                                           **common, **tools)
        if Endpoint.completion in self.spec.endpoints:
            self._completion = OpenAIServingCompletion(
                llm, models, online_renderer=renderer, request_logger=None,
                enable_prompt_tokens_details=True)

    async def generate(self, call: EngineCall) -> EngineResult:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import (
            create_error_response,
        )

        result: Any
        try:
            request = self._request(call)
            if (request.max_tokens == 0 and not getattr(request, "echo", False)) or \
                    getattr(request, "max_completion_tokens", None) == 0:
                return await self._zero_tokens(call.endpoint, request)
            if call.endpoint is Endpoint.chat:
                result = await self._layer(self._chat).create_chat_completion(request)
            else:
                result = await self._layer(self._completion).create_completion(request)
        except RequestRejected:
            raise
        except Exception as e:  # vLLM 0.32 raises on a bad request
            result = create_error_response(e)
        if isinstance(result, ErrorResponse):
            raise _rejected(result)
        if isinstance(result, AsyncIterator):
            return result
        return result.model_dump(exclude_none=True)

    @staticmethod
    def _request(call: EngineCall) -> Any:
        """vLLM's own protocol model of the call's endpoint."""
        if call.endpoint is Endpoint.chat:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
            return ChatCompletionRequest.model_validate(call.payload)
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        return CompletionRequest.model_validate(call.payload)

    @staticmethod
    def _layer(layer: L | None) -> L:
        if layer is None:
            raise RequestRejected(Rejected(404, "This model does not serve this endpoint.",
                                           "model", "NotFoundError"))
        return layer

    async def _zero_tokens(self, endpoint: Endpoint, request: Any) -> EngineResult:
        """`max_tokens: 0` (allowed by the API) asks for no generation: vLLM's sampler
        refuses 0, so render the prompt only, to count its tokens, and answer at once."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        layer: OpenAIServingChat | OpenAIServingCompletion
        if endpoint is Endpoint.chat:
            layer = self._layer(self._chat)
            rendered = await layer.render_chat_request(request)
            inputs = rendered if isinstance(rendered, ErrorResponse) else rendered[1]
        else:
            layer = self._layer(self._completion)
            inputs = await layer.render_completion_request(request)
        if isinstance(inputs, ErrorResponse):
            raise _rejected(inputs)
        prompt_tokens = sum(layer._extract_prompt_len(i) for i in inputs)
        choices = (request.n or 1) * (1 if endpoint is Endpoint.chat else len(inputs))
        return _empty_result(endpoint, self.spec.id, prompt_tokens, choices,
                             bool(request.stream))

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


def _empty_result(endpoint: Endpoint, model: str, prompt_tokens: int, choices: int,
                  stream: bool) -> EngineResult:
    """The answer to `max_tokens: 0`: each choice empty, finished by its length limit."""
    chat = endpoint is Endpoint.chat
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": model}
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
             "total_tokens": prompt_tokens}
    empty: dict[str, Any] = ({"message": {"role": "assistant", "content": ""}} if chat
                             else {"text": "", "logprobs": None})
    if not stream:
        return head | {"usage": usage, "choices": [
            {"index": i, **empty, "finish_reason": "length"} for i in range(choices)]}
    if chat:
        head["object"] = "chat.completion.chunk"
        empty = {"delta": {"role": "assistant", "content": ""}}
    events = [[{"index": i, **empty, "finish_reason": "length"}] for i in range(choices)]

    async def sse() -> AsyncIterator[str]:
        for choice in events:
            yield f"data: {json.dumps(head | {'choices': choice})}\n\n"
        yield f"data: {json.dumps(head | {'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return sse()
