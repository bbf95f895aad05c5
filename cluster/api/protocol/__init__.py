"""The OpenAI protocol as this API documents it, one module per endpoint as in vLLM's
``entrypoints/openai/*/protocol.py``: request fields, ranges and defaults (validated here,
at the edge; the hosted API's parameter table), and the model-list shapes.

Engines receive ``request.engine_payload()``: only what the client set, plus the API's
sampling defaults, so vLLM applies the same defaults it documents.
"""

from cluster.api.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from cluster.api.protocol.common import MAX_USER_LENGTH, GenerationRequest
from cluster.api.protocol.completion import CompletionRequest, CompletionResponse
from cluster.api.protocol.models import ModelCard, ModelList

__all__ = ["MAX_USER_LENGTH", "ChatCompletionRequest", "ChatCompletionResponse",
           "CompletionRequest", "CompletionResponse", "GenerationRequest", "ModelCard",
           "ModelList"]
