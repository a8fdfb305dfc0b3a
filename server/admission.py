"""Admission control: one request on the GPU at a time, a bounded FIFO of the ones waiting behind it.

A request first `reserve()`s a ticket: synchronously, before any response byte is sent, so a full queue
is an immediate 429. The ticket either holds the GPU slot at once or waits in line; `wait_turn()` returns
when it holds the slot. `release()` hands the slot to the oldest waiter. Releasing (or cancelling) a
ticket in any state is safe and idempotent, so every exit path can simply release.
"""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    """No room in the queue: the caller should answer 429."""


class Ticket:
    """A request's place: waiting, holding the slot, or released."""

    def __init__(self, admission: Admission, request_id: str) -> None:
        self.request_id = request_id
        self._admission = admission
        self._turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.released = False

    @property
    def holds_slot(self) -> bool:
        return self._turn.done() and not self.released

    async def wait_turn(self) -> None:
        """Wait until this ticket holds the slot. Cancelling the wait gives the place up."""
        try:
            await asyncio.shield(self._turn)
        except asyncio.CancelledError:
            self.release()
            raise

    def release(self) -> None:
        """Leave the line, or free the slot for the next waiter."""
        self._admission._release(self)


class Admission:
    """Bounded FIFO in front of a single execution slot (batch size 1)."""

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self.max_waiting = max_waiting
        self._waiting: deque[Ticket] = deque()
        self._running: Ticket | None = None

    @property
    def waiting(self) -> int:
        """Requests admitted but not yet running (the queue depth)."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        return 0 if self._running is None else 1

    def reserve(self, request_id: str) -> Ticket:
        """Admit a request or raise `QueueFull`. The slot goes to it at once if nobody is ahead."""
        ticket = Ticket(self, request_id)
        if self._running is None and not self._waiting:
            self._grant(ticket)
        elif len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"the request queue is full ({self.max_waiting} waiting)")
        else:
            self._waiting.append(ticket)
        return ticket

    def _grant(self, ticket: Ticket) -> None:
        self._running = ticket
        ticket._turn.set_result(None)

    def _release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        if ticket is self._running:
            self._running = None
            if self._waiting:
                self._grant(self._waiting.popleft())
        else:
            self._waiting.remove(ticket)
