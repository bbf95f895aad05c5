"""schemathesis on the real stack: every public route of the document the stack serves,
valid and invalid data, through HAProxy, the ingress, Redis and vLLM. No 5xx and OpenAI's
error shape on every refusal; valid data also gets responses as documented. Generated token
budgets are capped at a few tokens so that vLLM on a CPU answers each case in about a second
(the unit fuzzing in tests/test_fuzz.py covers the admin API with its key)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.case import Case
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from cluster.tools.stack import LocalStack
from tests.support.request_fuzz import openai_error_shape

MAX_TOKENS = 4
BUDGETS = ("max_tokens", "max_completion_tokens")


def capped(case: Case) -> Case:
    body = case.body
    if isinstance(body, dict):
        for name in BUDGETS:
            if not isinstance(body.get(name), int) or body[name] > MAX_TOKENS:
                body[name] = MAX_TOKENS
    return case


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_stack_holds_under_fuzzing(stack: LocalStack, api_key: str,
                                       mode: GenerationMode) -> None:
    doc = httpx.get(f"{stack.base_url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    auth = {"Authorization": f"Bearer {api_key}"}
    checks: list[Any] = [not_a_server_error, openai_error_shape]
    operations = [r.ok() for r in schema.get_all_operations()]
    public = [op for op in operations if not op.path.startswith("/admin")]
    assert len(public) >= 7  # chat, completions (two prefixes each), models (two), health

    statuses: dict[str, list[int]] = {}
    for operation in public:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # the public GETs take no input: nothing can be made invalid
        @given(case=operation.as_strategy(mode, headers=auth))
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Case) -> None:
            response = capped(case).call(base_url=stack.base_url, timeout=60)
            statuses.setdefault(case.operation.path, []).append(response.status_code)
            if mode is GenerationMode.POSITIVE:
                case.validate_response(response, additional_checks=[openai_error_shape],
                                       excluded_checks=[positive_data_acceptance])
            else:
                case.validate_response(response, checks=checks)

        run()
    # Not vacuous: valid generations reached vLLM and answered; invalid ones were refused.
    served = statuses["/v1/chat/completions"] + statuses["/v1/completions"]
    wanted = 200 if mode is GenerationMode.POSITIVE else 400
    assert served.count(wanted) >= 4, statuses
