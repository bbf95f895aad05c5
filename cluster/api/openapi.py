"""The served OpenAPI document, made to say what the server really accepts: the model ids
each endpoint serves (an enum), the bounds on `n` and on token counts, and 400 (this API's
validation status, in OpenAI's error shape) where FastAPI would document a 422 it never
sends."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from cluster.config.catalog import Endpoint, ModelSpec

REQUEST_SCHEMAS = {Endpoint.chat: "ChatCompletionRequest",
                   Endpoint.completion: "CompletionRequest"}


def describe(doc: dict[str, Any], specs: list[ModelSpec]) -> dict[str, Any]:
    schemas = doc["components"]["schemas"]
    for endpoint, name in REQUEST_SCHEMAS.items():
        served = [s for s in specs if endpoint in s.endpoints]
        if name not in schemas or not served:
            continue
        props = schemas[name]["properties"]
        props["model"]["enum"] = [s.id for s in served]
        props["n"]["maximum"] = max(s.max_choices for s in served)
        longest = max(s.engine.max_model_len for s in served)
        for limit in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if limit in props:  # the prompt takes at least one token of the context
                _set_maximum(props[limit], longest - 1)
    for path in doc["paths"].values():
        for operation in path.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {"description": "Invalid request", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return doc


def _set_maximum(prop: dict[str, Any], maximum: int) -> None:
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option["maximum"] = min(option.get("maximum", maximum), maximum)


def install(app: FastAPI, specs: list[ModelSpec]) -> None:
    """Serve :func:`describe`'s document at ``/openapi.json`` (built once, on first ask)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(get_openapi(
                title=app.title, version=app.version, routes=app.routes), specs)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
