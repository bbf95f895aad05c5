"""The OpenAI chat-completions protocol as this API documents it: request fields, ranges and
defaults (validated here, at the edge; the hosted API's parameter table), and the
model-list shapes.

Engines receive ``ChatCompletionRequest.engine_payload()``: only what the client set, so
vLLM applies the same defaults it documents.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_SEED = 2**63 - 1
MAX_USER_LENGTH = 256  # longer `user` values are a 400
MAX_STOP_SEQUENCES = 16


# The API's sampling defaults, sent explicitly (vLLM would otherwise apply the model's own).
SAMPLING_DEFAULTS = ("temperature", "top_p", "min_p", "top_k", "presence_penalty",
                     "frequency_penalty", "repetition_penalty")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Model):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class FunctionCall(_Model):
    name: str
    arguments: str


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Model):
    role: Literal["system"]
    content: Content
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _has_content_or_calls(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Model):
    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(min_length=1)


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage,
                    Field(discriminator="role")]


class FunctionDefinition(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(_Model):
    include_usage: bool = False


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StructuredOutputs(_Model):
    """vLLM's constrained decoding: exactly one of the constraints, plus its options."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None  # EBNF
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredOutputs:
        given = [k for k, v in self.model_dump(by_alias=True).items()
                 if k in CONSTRAINTS and v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(CONSTRAINTS)}")
        return self


CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class ChatCompletionRequest(_Model):
    """`POST /v1/openai/chat/completions`, with the ranges of the API's parameter table."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, le=1)
    top_k: int = Field(0, ge=0, lt=1000)
    max_tokens: int | None = Field(None, ge=0, le=1_000_000)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, ge=0.01, le=5)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    user: str | None = Field(None, max_length=MAX_USER_LENGTH)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    # Accepted because the openai SDK and common clients send them; passed to the engine.
    max_completion_tokens: int | None = Field(None, ge=0, le=1_000_000)
    n: Literal[1] = 1
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool | None = None
    # vLLM's extra fields (its OpenAI dialect, which vLLM's own clients such as
    # `vllm bench serve` send); validated here, applied by the engine.
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=1_000_000)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_SEQUENCES)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    priority: int = Field(0, ge=-MAX_SEED - 1, le=MAX_SEED)  # needs priority scheduling
    structured_outputs: StructuredOutputs | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, v: int, info: ValidationInfo) -> int:
        limits = [info.data.get(k) for k in ("max_completion_tokens", "max_tokens")]
        limit = next((x for x in limits if x is not None), None)
        if limit is not None and v > limit:
            raise ValueError(f"min_tokens ({v}) must not exceed max_tokens ({limit})")
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
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.tool_choice == "auto" and not self.tools:
            raise ValueError("tool_choice 'auto' needs tools")
        return self

    @property
    def output_limit(self) -> int | None:
        """The client's cap on generated tokens, by either name."""
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def engine_payload(self) -> dict[str, Any]:
        """What the engine gets: the fields the client set, plus the API's sampling
        defaults spelled out, so a model's own generation config cannot change them."""
        payload = self.model_dump(exclude_unset=True, exclude_none=True, by_alias=True)
        payload |= {k: getattr(self, k) for k in SAMPLING_DEFAULTS if k not in payload}
        payload["messages"] = [m.model_dump(exclude_none=True) for m in self.messages]
        return payload

    def estimated_prompt_tokens(self) -> int:
        """A cheap upper-ish estimate used to reserve rate-limit capacity before the engine
        tokenizes; settlement corrects it to the real count."""
        chars = 0
        for m in self.messages:
            content = getattr(m, "content", None)
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(p.text) for p in content)
            chars += 16  # role and template tokens
        return chars // 3 + 8


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    context_length: int
    description: str
    pricing: dict[str, float | str | None]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
