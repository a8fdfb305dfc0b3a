"""`X-Request-Id`: one id per HTTP request, so a client can find its request in the server's logs.

The client's own `X-Request-Id` is echoed when it sent a usable one (printable ASCII, at most 128
characters: it goes into log lines); otherwise the server makes one. The middleware puts it in the ASGI
scope, where routes, error handlers and the API-key check read it (`request_id_of`), and on every
response, errors and event streams included. Completion requests carry it to the worker, whose log lines
for that request quote it.
"""

from __future__ import annotations

import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-Id"
_SCOPE_KEY = "subspec.request_id"
_MAX_LENGTH = 128


def accepted_request_id(value: str | None) -> str | None:
    """The client's id if it is safe to echo and log (printable ASCII without spaces, <= 128 chars)."""
    if not value or len(value) > _MAX_LENGTH or not all("!" <= c <= "~" for c in value):
        return None
    return value


def log_suffix(request_id: str | None) -> str:
    """What log lines about a request end with, so they can be found by its X-Request-Id (after the fixed
    part of the line, which keeps its format)."""
    return "" if request_id is None else f" [{HEADER} {request_id}]"


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(request: Request | Scope) -> str | None:
    """The id the middleware gave this request (None outside the middleware, e.g. in unit tests)."""
    scope = request.scope if isinstance(request, Request) else request
    return scope.get(_SCOPE_KEY)


class RequestIdMiddleware:
    """ASGI middleware (the outermost one): assign the request id and add it to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = accepted_request_id(Headers(scope=scope).get(HEADER)) or new_request_id()
        scope[_SCOPE_KEY] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
