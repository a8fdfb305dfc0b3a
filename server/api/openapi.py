"""The OpenAPI document, made to say what the server does.

FastAPI's generated document promises a 422 with its own validation-error body on every route with a body
or parameters; this server answers 400 with an OpenAI error object instead (server.api.errors), so the 422 is
removed and the 400 documented. With an API key set, the /v1 operations declare the bearer scheme they
require. Routes declare everything else they can answer with `error_responses`. Value constraints the
server enforces after parsing (server.worker.runner, server.api.prompting) are declared on the request schemas here
(`_declare_enforced_constraints`), so a client can tell from the document alone which values are accepted.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.api.schemas import ErrorResponse

_DESCRIPTIONS = {
    400: "Invalid request (OpenAI error object naming the parameter)",
    401: "Missing or wrong API key (only when the server has one)",
    404: "Unknown model",
    408: "The request body did not arrive in time (--read-timeout)",
    413: "The request body is larger than --max-body-bytes",
    429: "The queue is full (Retry-After)",
    500: "The engine failed on this request, or its worker died while running it",
    503: "The engine worker is loading or restarting, or the server is shutting down (Retry-After)",
    504: "The request passed --request-timeout",
}
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with the OpenAI error object as its body."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


def openapi_document(app: FastAPI, *, bearer_auth: bool, vocab_size: int) -> dict[str, Any]:
    """The app's OpenAPI document (built once, then cached on the app); `vocab_size` bounds token ids."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # never sent: validation errors are 400s
            if bearer_auth and path.startswith("/v1/"):
                operation["security"] = [{"bearerAuth": []}]
    components = document.setdefault("components", {})
    schemas = components.get("schemas", {})
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    _declare_enforced_constraints(schemas, vocab_size)
    if bearer_auth:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = document
    return document


def _members(prop: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives of a property schema (its anyOf members, or itself)."""
    return prop.get("anyOf", [prop])


def _declare_enforced_constraints(schemas: dict[str, Any], vocab_size: int) -> None:
    """Declare the checks made after parsing: the request models (server.api.schemas) accept these values
    and the endpoints answer 400 for them. (Declared here so server/api/schemas.py keeps describing the
    parsing alone; when the models take these constraints as Field metadata, this goes.)"""
    token_id = {"minimum": 0, "maximum": vocab_size - 1}  # prompting.PromptBuilder.completion
    for member in _members(schemas["CompletionRequest"]["properties"]["prompt"]):
        if member.get("type") == "string":
            member["minLength"] = 1  # "the prompt is empty"
        elif member.get("type") == "array":
            member["minItems"] = 1
            items = member["items"]
            if items.get("type") == "integer":
                items.update(token_id)
            else:  # one text or one id list: batched prompts are not supported
                member["maxItems"] = 1
                if items.get("type") == "string":
                    items["minLength"] = 1
                else:
                    items["minItems"] = 1
                    items["items"].update(token_id)
    # endpoint.sampling_params: "max_tokens must be at least 1", except a completion's with echo, which may be 0
    for model, name, minimum in (("CompletionRequest", "max_tokens", 0),
                                 ("ChatCompletionRequest", "max_tokens", 1),
                                 ("ChatCompletionRequest", "max_completion_tokens", 1),
                                 ("ResponsesRequest", "max_output_tokens", 1)):
        for member in _members(schemas[model]["properties"][name]):
            if member.get("type") == "integer":
                member["minimum"] = minimum
    # schemas.SamplingFields._check_stop: at most 16, none empty
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        for member in _members(schemas[model]["properties"]["stop"]):
            if member.get("type") == "string":
                member["minLength"] = 1
            elif member.get("type") == "array":
                member["maxItems"] = 16
                member["items"]["minLength"] = 1
    # OpenAI's own ranges, of which the server honours the first value (others: 400 unsupported_parameter)
    for model, name in (("ChatCompletionRequest", "n"), ("CompletionRequest", "n"), ("CompletionRequest", "best_of")):
        for member in _members(schemas[model]["properties"][name]):
            if member.get("type") == "integer":
                member["minimum"] = 1
    for member in _members(schemas["ChatCompletionRequest"]["properties"]["modalities"]):
        if member.get("type") == "array":
            member["items"]["enum"] = ["text", "audio"]
    # schemas.ContentPart._text_only
    schemas["ContentPart"]["properties"]["type"]["enum"] = ["text"]
