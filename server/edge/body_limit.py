"""Request framing, body size, body read timeout and JSON shape, enforced before the app sees a body.

The body is read here, chunk by chunk:
- a request with both Content-Length and Transfer-Encoding is a 400 and its connection is closed
  (RFC 9112 6.3: such a message may be a smuggling attempt; a proxy framing it by Content-Length would see
  one request where the server sees two);
- a declared Content-Length over the limit is answered 413 without reading a byte of the body;
- a chunked body is cut off with 413 as soon as it passes the limit;
- a body that has not fully arrived `read_timeout_s` after the request head is answered 408;
- a JSON body nested too deep or with too many or too long member names is a 400 (server/api/input_limits.py).
After a framing, size or time error the connection is closed (the protocol lingers first, so the client
reads the answer). No request can make the server hold more than `max_bytes` of it, or keep a connection by
trickling its body. The app gets the body replayed in one message; later `receive()` calls (disconnect
detection) go to the client as usual.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError
from server.api.input_limits import json_shape_error
from server.edge.request_id import request_id_of

_INLINE_SHAPE_CHECK_BYTES = 64 * 1024


class BodyLimitMiddleware:
    """400 for ambiguous framing, 413 for bodies over `max_bytes`, 408 for bodies slower than `read_timeout_s`,
    400 for JSON past the shape limits; replays the body otherwise."""

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
        headers = Headers(scope=scope)
        if "transfer-encoding" in headers and "content-length" in headers:
            await self._reject(scope, send, APIError(
                400, "the request has both Content-Length and Transfer-Encoding headers; send only one",
                code="ambiguous_framing"), close=True)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max:
            await self._reject(scope, send, self._too_large(f"{int(declared)} bytes"), close=True)
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
                        await self._reject(scope, send, self._too_large(f"more than {self._max} bytes"), close=True)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._reject(scope, send, APIError(
                408, f"the request body did not arrive within {self._timeout:g} s", code="request_timeout"),
                close=True)
            return
        if first is None:
            body = b"".join(chunks)
            shape_error = None
            if len(body) > _INLINE_SHAPE_CHECK_BYTES:  # parsing a large body would stall the event loop
                shape_error = await asyncio.to_thread(json_shape_error, body)
            elif body:
                shape_error = json_shape_error(body)
            if shape_error is not None:
                await self._reject(scope, send, shape_error, close=False)
                return
            first = {"type": "http.request", "body": body, "more_body": False}
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

    async def _reject(self, scope: Scope, send: Send, error: APIError, *, close: bool) -> None:
        """Answer `error`; with `close`, also end the connection: the unread rest of the body must not be taken
        as a request."""
        self._on_reject(scope["path"], error)
        if close:
            error.headers = {**(error.headers or {}), "Connection": "close"}
        await error.response(request_id_of(scope))(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
