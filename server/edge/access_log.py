"""The access log: one bounded line per HTTP request, written when its response starts.

    127.0.0.1:52044 "POST /v1/chat/completions" 200 0.031 s [X-Request-Id 3f2a...]

It replaces uvicorn's own, which prints the query string (where a client may have put `?api_key=...`) and
the path at any length. Here the path is cut to `_MAX_PATH` characters and escaped to printable ASCII, and
the query string is never printed, so a request can neither leak a secret into the log nor grow it by more
than a few hundred bytes.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.edge.request_id import log_suffix, request_id_of

logger = logging.getLogger("server.access")

_MAX_PATH = 200


def _printable(text: str, limit: int) -> str:
    escaped = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


class AccessLogMiddleware:
    """ASGI middleware (inside RequestIdMiddleware, which gives the id it quotes)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        logged = False

        def log(status: int) -> None:
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            logger.info('%s "%s %s" %d %.3f s%s', where, scope["method"], _printable(scope["path"], _MAX_PATH),
                        status, time.monotonic() - started, log_suffix(request_id_of(scope)))

        async def logging_send(message: Message) -> None:
            nonlocal logged
            if message["type"] == "http.response.start" and not logged:
                logged = True
                log(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            if not logged:
                log(499)  # the client left before any response was sent
