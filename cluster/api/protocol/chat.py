"""`POST /v1/chat/completions`: messages, tools and the chat-only fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from cluster.api.protocol.common import (
    GenerationRequest,
    ResponseOut,
    StrictModel,
    check_min_tokens,
    text_tokens,
)
from cluster.config.catalog import Endpoint


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class FunctionCall(StrictModel):
    name: str
    arguments: str


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(StrictModel):
    role: Literal["system"]
    content: Content
    name: str | None = None


class UserMessage(StrictModel):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(StrictModel):
    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _has_content_or_calls(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(StrictModel):
    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(min_length=1)


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage,
                    Field(discriminator="role")]


class FunctionDefinition(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(GenerationRequest):
    """`POST /v1/openai/chat/completions`, with the ranges of the API's parameter table."""

    endpoint = Endpoint.chat

    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    # Accepted because the openai SDK and common clients send them; passed to the engine.
    max_completion_tokens: int | None = Field(None, ge=0, le=1_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _above_min(cls, v: int | None, info: ValidationInfo) -> int | None:
        check_min_tokens(info.data.get("min_tokens", 0), v, "max_completion_tokens")
        return v

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _no_named_function(cls, v: Any) -> Any:
        if isinstance(v, dict) or v == "required":
            raise ValueError("only 'none' and 'auto' are supported; "
                             "specifying a particular function choice is not supported")
        return v

    @model_validator(mode="after")
    def _check_combinations(self) -> ChatCompletionRequest:
        if self.tool_choice == "auto" and not self.tools:
            raise ValueError("tool_choice 'auto' needs tools")
        return self

    @property
    def output_limit(self) -> int | None:
        """The client's cap on generated tokens, by either name."""
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def token_limits(self) -> dict[str, int]:
        given = {"max_completion_tokens": self.max_completion_tokens}
        return super().token_limits() | {k: v for k, v in given.items() if v is not None}

    def engine_payload(self) -> dict[str, Any]:
        payload = super().engine_payload()
        payload["messages"] = [m.model_dump(exclude_none=True) for m in self.messages]
        return payload

    def estimated_prompt_tokens(self) -> int:
        chars = 0
        for m in self.messages:
            content = getattr(m, "content", None)
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(p.text) for p in content)
            chars += 16  # role and template tokens
        return text_tokens(chars)


class ChatCompletionResponse(ResponseOut):
    object: Literal["chat.completion"]
