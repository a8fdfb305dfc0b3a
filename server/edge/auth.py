"""Bearer-token authentication for the /v1 endpoints and the API documentation (/docs, /redoc,
/openapi.json); /health and /metrics stay open for probes and scrapers, as in vLLM.

A middleware rather than a route dependency, so a request with a wrong key is rejected before its body is
even read: the client learns about the key first, and an unauthenticated client cannot make the server
read a large body.
"""

from __future__ import annotations

import secrets
from typing import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import APIError
from server.edge.request_id import request_id_of

_DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def needs_key(path: str) -> bool:
    """Whether `path` is behind the API key (when one is set)."""
    return path.startswith("/v1/") or path in _DOC_PATHS


class APIKeyMiddleware:
    """Answer 401 to /v1 and documentation requests whose `Authorization: Bearer` token is not `api_key`."""

    def __init__(self, app: ASGIApp, *, api_key: str, on_reject: Callable[[str, APIError], None]) -> None:
        self.app = app
        self._key = api_key.encode()
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not needs_key(scope["path"]) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self._key):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided." if token else
                   "Missing API key: send it as 'Authorization: Bearer KEY'.")
        error = APIError(401, message, type="invalid_request_error", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
        self._on_reject(scope["path"], error)
        await error.response(request_id_of(scope))(scope, receive, send)
