"""Request body limit and body read timeout, enforced while the body arrives (ASGI middleware).

The body is read here, chunk by chunk, before the app sees it:
- a declared Content-Length over the limit is answered 413 without reading a byte of the body;
- a chunked body is cut off with 413 as soon as it passes the limit;
- a body that has not fully arrived `read_timeout_s` after the request head is answered 408.
Either way the connection is then closed. So no request can make the server hold more than `max_bytes` of
it, or keep a connection by trickling its body. The app gets the body replayed in one message; later
`receive()` calls (disconnect detection) go to the client as usual.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`, 408 for bodies slower than `read_timeout_s`; replays the rest."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, read_timeout_s: float,
                 on_reject: Callable[[str, APIError], None]) -> None:
        self.app = app
        self._max = max_bytes
        self._timeout = read_timeout_s
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self._max:
            await self._reject(scope, send, self._too_large(f"{int(declared)} bytes"))
            return
        chunks: list[bytes] = []
        size = 0
        first: Message | None = None
        try:
            async with asyncio.timeout(self._timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client left before sending it all
                        first = message
                        break
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self._max:
                        await self._reject(scope, send, self._too_large(f"more than {self._max} bytes"))
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._reject(scope, send, APIError(
                408, f"the request body did not arrive within {self._timeout:g} s", code="request_timeout"))
            return
        if first is None:
            first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body ({size}) is larger than this server's limit of {self._max} bytes "
                             f"(--max-body-bytes)", code="request_too_large")

    async def _reject(self, scope: Scope, send: Send, error: APIError) -> None:
        """Answer and close the connection: the unread rest of the body must not be taken as a request."""
        self._on_reject(scope["path"], error)
        error.headers = {**(error.headers or {}), "Connection": "close"}
        await error.response()(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
