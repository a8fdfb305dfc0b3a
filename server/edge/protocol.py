"""uvicorn's HTTP/1.1 protocol (h11) with deadlines for each request's head and for every write.

Two kinds of client hold a connection (and what it serves) forever unless the protocol times them out,
since the app never learns of them:
- one that sends half a request line or half its headers and then waits: from the moment a connection
  opens (or the next request on it starts arriving), the head must be complete within `header_timeout_s`;
- one that stops reading its response: once the transport's write buffer is full (writes paused), the
  client must accept bytes again within `write_timeout_s`, or the connection is aborted. The app sees a
  disconnect, so a stream that stalls is stopped and counted like a client that left.
The body's own deadline is `BodyLimitMiddleware`'s. h11 is used everywhere (also where httptools is
installed) so the rules hold in every deployment.

Each request's scope carries its connection (`scope[CONNECTION]`, a `Connection`): the app can see that the
client is gone at once (uvicorn itself only drops what is sent after that, so a stream would otherwise run
on as if delivered), and can cut the connection when it cannot finish a response, e.g. a stream whose deadline
passed while the client read nothing.

Closing a connection whose client is still sending a body (a 413 answered before the body was read, a
framing error) lingers, as nginx does: the response is sent and the write side shut (the client sees the
response end), then whatever the client still sends is read and dropped for up to `LINGER_S` seconds or
`LINGER_BYTES` bytes before the socket closes. Closing at once would make the kernel answer the client's
next bytes with a reset that destroys the response in its receive buffer: most HTTP clients (httpx, the
OpenAI SDK, urllib) then report a broken connection instead of the 413, and a proxy in front reports a 502.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

CONNECTION = "subspec.connection"  # scope key: the request's `Connection`
LINGER_S = 30.0
LINGER_BYTES = 64 << 20


class Connection:
    """What the app may know and do about its connection."""

    def __init__(self, protocol: TimedH11Protocol) -> None:
        self._protocol = protocol
        self.lost = False  # the client is gone, or the connection was cut

    def abort(self) -> None:
        """Cut the connection now, dropping whatever it has not sent."""
        self._protocol.abort()


class _LingeringTransport:
    """The socket as uvicorn sees it: `close()` lingers while the client is still sending a request body."""

    def __init__(self, transport: asyncio.Transport, protocol: TimedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        if not self._protocol.linger():
            self._transport.close()


class TimedH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose request head is late or whose client stops reading."""

    header_timeout_s = 30.0  # both set per server by `timed_h11`
    write_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._socket: asyncio.Transport | None = None  # the real transport under uvicorn's lingering view
        self._lingered: int | None = None  # bytes dropped while lingering; None: not lingering
        self.connection = Connection(self)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._socket = transport
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        if self._lingered is not None:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self._socket.close()
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_head()  # bytes of a request head (the first, or the next on a kept-alive connection)
        else:
            self._disarm_head()  # the head is complete: the app reads the body under its own deadline

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and CONNECTION not in cycle.scope:
            cycle.scope[CONNECTION] = self.connection  # type: ignore[literal-required]

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.lost = True
        self._disarm_head()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def linger(self) -> bool:
        """Start lingering instead of closing, if the client is still sending a request body."""
        assert self._socket is not None
        if self._lingered is not None or self.conn.their_state is not h11.SEND_BODY or self._socket.is_closing():
            return False
        self._lingered = 0
        self._disarm_head()
        if self._socket.can_write_eof():
            self._socket.write_eof()  # sent once the response is flushed: the client sees the response end
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self._socket.close)
        return True

    def eof_received(self) -> bool | None:
        return None  # the client is done sending: asyncio closes the transport (after a linger, too)

    def abort(self) -> None:
        """Drop the connection and whatever it has not sent (close() would wait to flush to a client that
        does not read)."""
        self.connection.lost = True
        self._write_timer = None
        self.transport.abort()  # also after a close() still waiting to flush

    def _arm_head(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def timed_h11(header_timeout_s: float, write_timeout_s: float) -> type[TimedH11Protocol]:
    """The protocol class to pass as uvicorn.Config(http=...), with these deadlines."""
    return type("TimedH11Protocol", (TimedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "write_timeout_s": write_timeout_s})
