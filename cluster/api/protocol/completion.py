"""`POST /v1/completions`: OpenAI's (legacy) completions API, a raw prompt continued."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from cluster.api.protocol.common import GenerationRequest, ResponseOut, text_tokens
from cluster.config.catalog import Endpoint

MAX_PROMPTS = 128  # prompts in one request: each is a choice (times n)
TokenId = Annotated[int, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]
Prompt = (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
          | Annotated[list[TokenId], Field(min_length=1)]
          | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                      Field(min_length=1, max_length=MAX_PROMPTS)])


class CompletionRequest(GenerationRequest):
    """`POST /v1/openai/completions`: the shared ranges, OpenAI's default of 16 tokens."""

    endpoint = Endpoint.completion

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0, le=1_000_000)
    echo: bool = False  # the prompt is returned before the completion
    logprobs: int | None = Field(None, ge=0, le=20)  # top log-probabilities per token
    suffix: str | None = None  # only models with fill-in-the-middle rendering take it

    def _prompts(self) -> list[str] | list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # one prompt of token ids
        return p  # type: ignore[return-value]

    @property
    def choices(self) -> int:
        return self.n * len(self._prompts())

    def engine_payload(self) -> dict[str, Any]:
        return super().engine_payload() | {"max_tokens": self.max_tokens}

    def estimated_prompt_tokens(self) -> int:
        return sum(text_tokens(len(p)) if isinstance(p, str) else len(p)
                   for p in self._prompts())


class CompletionResponse(ResponseOut):
    object: Literal["text_completion"]
