"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` frames, ending with `data: [DONE]`.

`SSEResponse` is Starlette's streaming response (which cancels the body when the client disconnects)
plus one guarantee the HTTP layer relies on: however the response ends (finished, client gone, server
shutting down), the body iterator is closed and `on_close` runs, so an unfinished generation is aborted
and its queue slot released promptly instead of whenever the garbage collector gets to it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

DONE_FRAME = b"data: [DONE]\n\n"


def sse_frame(payload: dict[str, Any]) -> bytes:
    """One SSE event carrying a JSON object. JSON never contains a raw newline, so one `data:` line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    """`text/event-stream` response whose body iterator is always closed, then `on_close` called."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], *, on_close: Callable[[], None] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._body.aclose()  # runs the generator's finally blocks (abort, release)
            except Exception:
                logger.exception("closing the event stream failed")
            if self._on_close is not None:
                self._on_close()


def sse_named_event(name: str, payload: dict[str, Any]) -> bytes:
    """One named SSE event, `event: NAME` then the JSON `data:` line, as the Responses API streams them."""
    return b"event: " + name.encode() + b"\n" + sse_frame(payload)
