"""What chat and completion requests share: sampling, stopping, streaming, `n`, the `user`
field and vLLM's extra fields, with their ranges; and what the service reads of a request."""

from __future__ import annotations

from abc import abstractmethod
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cluster.config.catalog import Endpoint

MAX_SEED = 2**63 - 1
MAX_USER_LENGTH = 256  # longer `user` values are a 400
MAX_STOP_SEQUENCES = 16
MAX_CHOICES = 128  # OpenAI's bound on `n`; each model file may set a lower one

# The API's sampling defaults, sent explicitly (vLLM would otherwise apply the model's own).
SAMPLING_DEFAULTS = ("temperature", "top_p", "min_p", "top_k", "presence_penalty",
                     "frequency_penalty", "repetition_penalty")


class StrictModel(BaseModel):
    """Unknown fields and lax coercions ("5" for 5, 0 for false) are 400s, as OpenAI's."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class StructuredOutputs(StrictModel):
    """vLLM's constrained decoding: exactly one of the constraints, plus its options."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

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


class GenerationRequest(StrictModel):
    """The fields of the API's parameter table that both endpoints take."""

    endpoint: ClassVar[Endpoint]

    model: str = Field(min_length=1)
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
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    response_format: ResponseFormat | None = None
    # vLLM's extra fields (its OpenAI dialect, which vLLM's own clients such as
    # `vllm bench serve` send); validated here, applied by the engine.
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=1_000_000)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_SEQUENCES)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
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
        return check_min_tokens(v, info.data.get("max_tokens"), "max_tokens")

    @model_validator(mode="after")
    def _shared_combinations(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 needs a temperature above 0: greedy sampling has one "
                             "answer")
        return self

    @property
    def output_limit(self) -> int | None:
        """The client's cap on generated tokens per choice."""
        return self.max_tokens

    def token_limits(self) -> dict[str, int]:
        """The completion's token counts the client gave, by field name: each must fit in
        the model's context with the prompt."""
        given = {"max_tokens": self.max_tokens, "min_tokens": self.min_tokens or None}
        return {k: v for k, v in given.items() if v is not None}

    @property
    def choices(self) -> int:
        """How many completions the request asks for: the engine generates each."""
        return self.n

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def engine_payload(self) -> dict[str, Any]:
        """What the engine gets: the fields the client set, plus the API's sampling
        defaults spelled out, so a model's own generation config cannot change them."""
        payload = self.model_dump(exclude_unset=True, exclude_none=True, by_alias=True)
        return payload | {k: getattr(self, k) for k in SAMPLING_DEFAULTS if k not in payload}

    @abstractmethod
    def estimated_prompt_tokens(self) -> int:
        """A cheap upper-ish estimate used to reserve rate-limit capacity before the engine
        tokenizes; settlement corrects it to the real count."""


def check_min_tokens(min_tokens: int, limit: int | None, name: str) -> int:
    if limit is not None and min_tokens > limit:
        raise ValueError(f"min_tokens ({min_tokens}) must not exceed {name} ({limit})")
    return min_tokens


def text_tokens(chars: int) -> int:
    """The estimate of :meth:`GenerationRequest.estimated_prompt_tokens` for some text."""
    return chars // 3 + 8


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens served from the prefix cache")


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    estimated_cost: float = Field(description="USD, from the model's per-token prices "
                                  "(cached prompt tokens at the model's cached price)")


class ResponseOut(BaseModel):
    """What every non-streamed answer has (choices as vLLM writes them)."""

    id: str
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: UsageOut
