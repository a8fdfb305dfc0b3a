"""The OpenAPI document, made to say what the server does.

FastAPI's generated document promises a 422 with its own validation-error body on every route with a body
or parameters; this server answers 400 with an OpenAI error object instead (server.errors), so the 422 is
removed and the 400 documented. With an API key set, the /v1 operations declare the bearer scheme they
require. Routes declare everything else they can answer with `error_responses`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.schemas import ErrorResponse

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


def openapi_document(app: FastAPI, *, bearer_auth: bool) -> dict[str, Any]:
    """The app's OpenAPI document (built once, then cached on the app)."""
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
    if bearer_auth:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = document
    return document
