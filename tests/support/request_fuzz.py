"""A Hypothesis generator of generation requests that reach the engine: a valid model and
key, each field drawn at a boundary of the API's parameter table or one step past it, on
chat or completions, streamed or not. Each request knows the status it must get: 200 when
every field is in range, else 400 naming one of the fields out of range.

Unit tests run it against the fake engine, the integration tests against vLLM. Also here:
the schemathesis check that every refusal has OpenAI's error shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import CheckContext
from schemathesis.core.transport import Response
from schemathesis.generation.case import Case

MAX_SEED = 2**63 - 1

# field: (values at the boundaries, values one step past them), from the parameter table.
# Token counts stay small so that the real engine answers fast.
BOUNDS: dict[str, tuple[list[Any], list[Any]]] = {
    "temperature": ([0.0, 2.0], [-0.01, 2.01]),
    "top_p": ([0.01, 1.0], [0.0, 1.01]),
    "min_p": ([0.0, 1.0], [-0.01, 1.01]),
    "top_k": ([0, 999], [-1, 1000]),
    "presence_penalty": ([-2.0, 2.0], [-2.01, 2.01]),
    "frequency_penalty": ([-2.0, 2.0], [-2.01, 2.01]),
    "repetition_penalty": ([0.01, 5.0], [0.009, 5.01]),
    "seed": ([0, MAX_SEED], [-1, MAX_SEED + 1]),
    "max_tokens": ([1, 4], [-1, "4"]),
    "min_tokens": ([0, 1], [-1]),
    "stop": (["\n", ["a", "b"]], ["", ["x"] * 17]),
    "ignore_eos": ([True, False], [1]),
    "user": (["u", "x" * 256], ["x" * 257]),
}
ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@dataclass(frozen=True)
class Drawn:
    path: str
    body: dict[str, Any]
    bad: frozenset[str]  # the fields out of range

    @property
    def status(self) -> int:
        return 400 if self.bad else 200


@st.composite
def requests(draw: st.DrawFn, model: str) -> Drawn:
    endpoint = draw(st.sampled_from(sorted(ENDPOINTS)))
    body: dict[str, Any] = {"model": model}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "Say something."}]
    else:
        body["prompt"] = "Once upon a time"
    fields = draw(st.lists(st.sampled_from(sorted(BOUNDS)), unique=True, max_size=5))
    bad = set()
    for name in fields:
        valid, invalid = BOUNDS[name]
        in_range = draw(st.booleans())
        body[name] = draw(st.sampled_from(valid if in_range else invalid))
        if not in_range:
            bad.add(name)
    body.setdefault("max_tokens", 4)
    if not bad and body.get("min_tokens", 0) > body["max_tokens"]:
        body["min_tokens"] = body["max_tokens"]
    if draw(st.booleans()):
        body["stream"] = True
    return Drawn(ENDPOINTS[endpoint], body, frozenset(bad))


def check(drawn: Drawn, status: int, reply: Any) -> None:
    """The answer :class:`Drawn` says, in OpenAI's shape."""
    assert status == drawn.status, (drawn, status, reply)
    if drawn.bad:
        assert isinstance(reply, dict) and reply["error"]["type"] == "invalid_request_error"
        param = (reply["error"]["param"] or "").split(".")[0].split("[")[0]
        assert param in drawn.bad, (drawn, reply)


@schemathesis.check
def openai_error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every refusal is OpenAI's `{"error": {message, type, param, code}}`."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return True
