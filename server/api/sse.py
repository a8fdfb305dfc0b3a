"""Server-sent events as OpenAI streams them, made apart from the socket.

A frame is `data: {json}\\n\\n` (chat and text completions end with `data: [DONE]`), or a named event
`event: TYPE\\n` + `data: {json}\\n\\n` (the Responses API). `SSEResponse` runs three tasks per stream:

    producer:  EventStream.frames() --> buffer (at most max_buffered_bytes not yet sent)
    sender:    buffer --> send()     (one write per batch of ready frames)
    listener:  receive() --> http.disconnect

so generation never waits on the client's socket: the engine's events are taken as they come, and the GPU
slot is released when the engine finishes, however slowly the client reads. How a stream ends, and how it
is counted:
- every frame sent: 200;
- the client disconnects: 499, the producer is cancelled (which aborts the engine request);
- the buffer is full (the client reads slower than the engine writes): 499; the producer stops (abort) and
  the stream ends with the endpoint's failure frames after what is buffered, so a slow client still reads
  why its stream ended;
- the request's deadline passes while frames wait to be sent: 504; unsent frames are dropped for the
  failure frames, which get `_LAST_FRAMES_S` to go out before the connection is closed.
A client that accepts no bytes at all for the write timeout is cut off by the HTTP protocol
(server/edge/protocol.py), which ends the stream as a disconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.api.errors import APIError
from server.edge.protocol import CONNECTION
from server.worker.telemetry import STATUS_CLIENT_CLOSED, RequestRecord

if TYPE_CHECKING:
    from server.api.endpoint import EventStream

logger = logging.getLogger(__name__)

DONE_FRAME = b"data: [DONE]\n\n"
_LAST_FRAMES_S = 5.0


def sse_frame(payload: dict[str, Any]) -> bytes:
    """One SSE event carrying a JSON object. JSON never contains a raw newline, so one `data:` line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_named_event(name: str, payload: dict[str, Any]) -> bytes:
    """One named SSE event, `event: NAME` then the JSON `data:` line, as the Responses API streams them."""
    return b"event: " + name.encode() + b"\n" + sse_frame(payload)


def client_too_slow(limit: int) -> APIError:
    return APIError(400, f"the client read the event stream too slowly: more than {limit} bytes waited to be "
                         f"sent, so the request was stopped", code="client_too_slow")


class _FrameBuffer:
    """Frames made but not yet sent, bounded in bytes (a single larger frame is let in when it is alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._frames: deque[bytes] = deque()
        self._bytes = 0
        self._changed = asyncio.Event()
        self.closed = False

    def put(self, frame: bytes, *, force: bool = False) -> bool:
        """Queue `frame`; False (and nothing queued) when it would pass the limit, unless `force`."""
        if not force and self._frames and self._bytes + len(frame) > self.limit:
            return False
        self._frames.append(frame)
        self._bytes += len(frame)
        self._changed.set()
        return True

    def close(self) -> None:
        """No more frames will come."""
        self.closed = True
        self._changed.set()

    @property
    def empty(self) -> bool:
        return not self._frames

    def drop(self) -> None:
        self._frames.clear()
        self._bytes = 0

    async def take(self) -> bytes | None:
        """Every frame queued so far, as one write; None once closed and empty."""
        while not self._frames:
            if self.closed:
                return None
            self._changed.clear()
            await self._changed.wait()
        data = b"".join(self._frames)
        self.drop()
        return data


class SSEResponse(Response):
    """`text/event-stream` response of one request's frames; records the request's outcome when it ends."""

    media_type = "text/event-stream"

    def __init__(self, stream: EventStream, *, record: RequestRecord, seconds_left: Callable[[], float | None],
                 max_buffered_bytes: int, headers: dict[str, str] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._stream = stream
        self._record = record
        self._seconds_left = seconds_left
        self._buffer = _FrameBuffer(max_buffered_bytes)
        self._status = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._produce())
        sender = asyncio.ensure_future(self._send_all(scope, send))
        listener = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
            completed = (sender.done() and not sender.cancelled() and sender.exception() is None
                         and sender.result())  # a send that raised (the client is gone) did not complete
            if not completed and self._status == 200:
                self._status = STATUS_CLIENT_CLOSED
        finally:
            for task in (producer, sender, listener):
                task.cancel()
            await asyncio.gather(producer, sender, listener, return_exceptions=True)
            self._record.finish(self._status)

    async def _produce(self) -> None:
        buffer = self._buffer
        try:
            frames = self._stream.frames()
            try:
                async for frame in frames:
                    if not buffer.put(frame):
                        self._status = STATUS_CLIENT_CLOSED
                        error = client_too_slow(buffer.limit)
                        break
                else:
                    return
            finally:
                await frames.aclose()  # an unfinished engine request is aborted here
            for frame in self._stream.failure(error):
                buffer.put(frame, force=True)
        except Exception:
            logger.exception("the event stream failed")
            self._status = 500
            for frame in self._stream.failure(APIError(500, "internal server error while streaming",
                                                       type="server_error", code="internal_error")):
                buffer.put(frame, force=True)
        finally:
            buffer.close()

    async def _send_all(self, scope: Scope, send: Send) -> bool:
        """Send every frame; True when the response was completed."""
        connection = scope.get(CONNECTION)  # None where the server is not ours (the listener still sees a
        # disconnect, only later)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        failed = False
        while True:
            data = await self._buffer.take()
            if data is None:
                break
            left = self._seconds_left()
            try:
                # past the deadline, the last frames (the reason it ended) still get a moment to go out
                async with asyncio.timeout(None if left is None else max(left, _LAST_FRAMES_S)):
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            except TimeoutError:
                if connection is not None:
                    connection.abort()
                self._status = 504
                return False
            if connection is not None and connection.lost:
                return False
            if not failed and self._unsent_past_deadline():
                # frames are left but the time is up: the client gets the reason instead of the rest
                failed = True
                self._status = 504
                self._buffer.drop()
                for frame in self._stream.failure(_deadline_error()):
                    self._buffer.put(frame, force=True)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return connection is None or not connection.lost

    def _unsent_past_deadline(self) -> bool:
        """The deadline has passed with every frame made (while generating, the runner enforces it) and some
        still unsent."""
        left = self._seconds_left()
        return left is not None and left <= 0 and self._buffer.closed and not self._buffer.empty


def _deadline_error() -> APIError:
    return APIError(504, "the request passed the server's request timeout while its reply was being sent; it was "
                         "stopped", type="timeout_error", code="request_timeout")


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
