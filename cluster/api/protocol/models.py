"""`GET /v1/models`: the served models, their context, prices and endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    context_length: int
    description: str
    pricing: dict[str, float | str | None]
    endpoints: list[str]  # the paths that serve this model, e.g. /v1/chat/completions
    max_choices: int  # the most choices one request may ask for (n x prompts)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
