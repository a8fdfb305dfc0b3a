"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request's head.

uvicorn closes idle keep-alive connections, but a client that sends half a request line or half its
headers and then waits holds its connection forever: the app never sees such a request, so only the
protocol can time it out. Here, from the moment a connection opens (or the next request on it starts
arriving), the request line and headers must be complete within `header_timeout_s`, or the connection is
closed. The body's own deadline is `BodyLimitMiddleware`'s. h11 is used everywhere (also where httptools
is installed) so the rule holds in every deployment.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose request head is not complete in time."""

    header_timeout_s = 30.0  # set per server by `timed_h11`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm()  # bytes of a request head (the first, or the next on a kept-alive connection)
        else:
            self._disarm()  # the head is complete: the app reads the body under its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def timed_h11(header_timeout_s: float) -> type[TimedH11Protocol]:
    """The protocol class to pass as uvicorn.Config(http=...), with this head deadline."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout_s": header_timeout_s})
