"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Error bodies also carry `request_id` (the request's `X-Request-Id`, see server/edge/request_id.py) when known,
so an error a user pastes can be found in the server's logs.

Route and serving code raise `APIError`; `install_error_handlers` turns it (and FastAPI's validation
errors, unknown routes, unexpected exceptions) into OpenAI error objects, so no client ever sees
FastAPI's default 422 body.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.edge.request_id import HEADER as REQUEST_ID_HEADER
from server.edge.request_id import request_id_of

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}

    def response(self, request_id: str | None = None, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        """The error as a JSON response. A 503 or 429 always says when to retry."""
        headers = {**(extra_headers or {}), **(self.headers or {})}
        if self.status_code in _RETRY_AFTER_S:
            headers.setdefault("Retry-After", _RETRY_AFTER_S[self.status_code])
        # The id is set here too (not only by the middleware): Starlette answers unhandled exceptions from
        # outside every middleware.
        if request_id is not None:
            headers[REQUEST_ID_HEADER] = request_id
        return _ErrorJSON(self.body(request_id), status_code=self.status_code, headers=headers or None)


_RETRY_AFTER_S = {429: "1", 503: "5"}


class _ErrorJSON(JSONResponse):
    """A JSON response that cannot fail to render: text the client sent back to it in a message (a lone
    surrogate) becomes a `\\uXXXX` escape instead of a UnicodeEncodeError, i.e. a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", errors="backslashreplace")


def bad_request(message: str, *, param: str | None = None, code: str) -> APIError:
    """A 400; every one has a `code` a client can branch on."""
    return APIError(400, message, param=param, code=code)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param_name(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'.

    Pydantic adds a tag per union member to `loc` ('str', 'list[str]', 'ContentPart'); they are not
    parameter names, so they are dropped.
    """
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
            continue
        part = str(part)
        if part == "body" or part in _TYPE_TAGS or "[" in part or part[:1].isupper():
            continue
        name += f".{part}" if name else part
    return name or None


def validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming each offending parameter, in OpenAI's words where it has them."""
    messages: list[str] = []
    first_param: str | None = None
    for error in exc.errors():
        kind = error.get("type", "")
        loc = tuple(error.get("loc", ()))
        param = None if kind == "json_invalid" else _param_name(loc)  # its loc holds a character offset
        first_param = first_param or param
        if kind == "json_invalid":
            messages.append(f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}".rstrip(": "))
        elif kind == "extra_forbidden":
            messages.append(f"Unrecognized request argument supplied: {param}")
        elif kind == "missing":
            if param is None:
                messages.append("the request body is missing (send a JSON object)")
            else:
                messages.append(f"Missing required parameter: '{param}'")
        elif param is None:
            messages.append(f"the request body must be a JSON object: {error.get('msg')}")
        else:
            messages.append(f"Invalid value for '{param}': {error.get('msg')}")
    # A union (e.g. `stop: str | list[str]`) reports one error per member: keep each message once.
    unique = list(dict.fromkeys(messages))
    return APIError(400, "; ".join(unique) or "invalid request", param=first_param, code="invalid_value")


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI, on_error: Callable[[Request, APIError], None]) -> None:
    """Register handlers that answer every failure with an OpenAI error object.

    `on_error(request, error)` is called for errors raised before a route could count the request
    (validation, authentication, unknown paths) so metrics still see them.
    """

    async def handle_api_error(request: Request, exc: APIError) -> JSONResponse:
        on_error(request, exc)
        return exc.response(request_id_of(request))

    async def handle_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        on_error(request, error)
        return error.response(request_id_of(request))

    async def handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500
                         else "server_error", code=_HTTP_CODES.get(exc.status_code, "http_error"),
                         headers=getattr(exc, "headers", None))
        on_error(request, error)
        return error.response(request_id_of(request))

    async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s (request %s)", request.url.path, request_id_of(request))
        error = APIError(500, f"internal server error: {type(exc).__name__}", type="server_error",
                         code="internal_error")
        on_error(request, error)
        return error.response(request_id_of(request))

    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation)
    app.add_exception_handler(StarletteHTTPException, handle_http)
    app.add_exception_handler(Exception, handle_unexpected)
