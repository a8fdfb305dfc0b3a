"""The OpenAPI document against the live server: schemathesis generates requests for every operation
(schema-valid and schema-violating ones), sends them to `subspec serve` with the real default model, and
runs all of its checks on every response. Zero 5xx, and every status, header, content type and body must be
one the document declares.

`max_tokens` / `max_completion_tokens` / `max_output_tokens` are capped at 2 (and set when absent: a request
without one may fill the whole context), so each accepted request is a prefill plus at most one more step.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.server.conftest import API_KEY

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_TOKENS = 2
FUZZED_EXAMPLES = int(os.environ.get("SUBSPEC_FUZZ_EXAMPLES", "20"))
# Bounded, so it fits CI: the same cases in every run (a fixed seed, no example database), and no shrinking:
# a failure is reported as found (hypothesis once spent over 20 minutes shrinking one). The cases are
# schemathesis' examples and coverage phases (values at and past each schema boundary) and FUZZED_EXAMPLES
# generated ones per operation. Before a release, fuzz wider: SUBSPEC_FUZZ_EXAMPLES=500 SUBSPEC_FUZZ_SEED=<any>.
BOUNDED_PHASES = [Phase.explicit, Phase.generate]

# A schema-valid request may still get a 400 for reasons the document cannot express; for those 400s,
# and only those, the "valid data must be accepted" check is skipped:
# - `unsupported_parameter`: a parameter set to a value this server cannot honour (n > 1, penalties,
#   logit_bias, a response_format other than text...): what it can honour is accepted (tolerant parsing),
#   but a schema that stays OpenAI's cannot say which of OpenAI's values are refused.
# - `context_length_exceeded`: prompt + max_tokens over max_model_len depends on the tokenizer and the
#   model; no JSON schema can state it.
# - rules across fields (tool_choice without tools, top_logprobs without logprobs, a tool message without
#   the call it answers...), which JSON Schema cannot state either: accepted as such when the 400 is an
#   OpenAI `invalid_request_error` whose `param` is a field the request set (the client is told what to fix).
SCHEMA_INEXPRESSIBLE_400_CODES = {"unsupported_parameter", "context_length_exceeded"}


@pytest.fixture(scope="module")
def live_schema(real_server) -> Any:
    config = schemathesis.Config.from_dict({
        "headers": AUTH, "seed": int(os.environ.get("SUBSPEC_FUZZ_SEED", "0")),
        "generation": {"max-examples": FUZZED_EXAMPLES},
    })
    return schemathesis.openapi.from_url(f"{real_server.base_url}/openapi.json", headers=AUTH, config=config)


schema = schemathesis.pytest.from_fixture("live_schema")


def small_generation(path: str, body: Any) -> None:
    """Keep accepted requests cheap: at most MAX_TOKENS tokens, whatever else the case says (a request without a
    limit may fill the whole context: minutes on the CPU)."""
    if not isinstance(body, dict):
        return
    names = ("max_output_tokens",) if path.endswith("/responses") else ("max_tokens", "max_completion_tokens")
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if all(body.get(name) is None for name in names):
        body[names[0]] = MAX_TOKENS


def excluded_checks(case: Any, response: Any) -> list:
    """Checks skipped for this one response (see the comment above SCHEMA_INEXPRESSIBLE_400_CODES)."""
    if response.status_code != 400:
        return []
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return []
    if error["code"] in SCHEMA_INEXPRESSIBLE_400_CODES:
        return [positive_data_acceptance]
    param = (error.get("param") or "").split(".")[0].split("[")[0]
    if (error.get("type") == "invalid_request_error" and error.get("message") and isinstance(case.body, dict)
            and case.body.get(param) is not None):
        # a rule across fields, or a value JSON Schema calls valid that the server cannot take exactly: 3.0
        # where an integer is asked for (the request models are strict, as OpenAI's API answers 400 there), or a
        # seed past int64 that the schema validator, comparing big integers as doubles, rounds into range
        return [positive_data_acceptance]
    return []


@schema.parametrize()
@settings(max_examples=FUZZED_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), phases=BOUNDED_PHASES,
          database=None)
def test_the_live_server_conforms_to_its_openapi_document(case):
    small_generation(case.path, case.body)
    response = case.call(headers=AUTH, timeout=120)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
    case.validate_response(response, headers=AUTH, excluded_checks=excluded_checks(case, response))
