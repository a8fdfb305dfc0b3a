"""Admission control: up to `slots` requests on the GPU at once (the engine's max_num_seqs, as its worker reports
it when ready; 1 before), a bounded FIFO of the ones waiting behind them.

A request first `reserve()`s a ticket: synchronously, before any response byte is sent, so a full queue
is an immediate 429. The ticket either holds a GPU slot at once or waits in line; `wait_turn()` returns
when it holds one. `release()` hands the slot to the oldest waiter. Releasing (or cancelling) a
ticket in any state is safe and idempotent, so every exit path can simply release. `close()` (graceful
shutdown) turns new requests away and ends every waiting ticket's wait with `AdmissionClosed`.
"""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    """No room in the queue: the caller should answer 429."""


class AdmissionClosed(Exception):
    """The server is shutting down: no new requests, and queued ones will not run (503)."""


class Ticket:
    """A request's place: waiting, holding the slot, or released."""

    def __init__(self, admission: Admission, request_id: str) -> None:
        self.request_id = request_id
        self._admission = admission
        # Resolves to None when the slot is granted, or to the AdmissionClosed that ended the wait (a result,
        # not an exception: a ticket whose response never started waiting must not log an unretrieved error).
        self._turn: asyncio.Future[AdmissionClosed | None] = asyncio.get_running_loop().create_future()
        self.released = False

    @property
    def holds_slot(self) -> bool:
        return self._turn.done() and self._turn.result() is None and not self.released

    async def wait_turn(self) -> None:
        """Wait until this ticket holds the slot. Cancelling the wait gives the place up; raises
        AdmissionClosed if the server shuts down first."""
        try:
            closed = await asyncio.shield(self._turn)
        except asyncio.CancelledError:
            self.release()
            raise
        if closed is not None:
            raise closed

    def release(self) -> None:
        """Leave the line, or free the slot for the next waiter."""
        self._admission._release(self)


class Admission:
    """Bounded FIFO in front of `slots` execution slots (the sequences the engine decodes together)."""

    def __init__(self, max_waiting: int, slots: int = 1) -> None:
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.max_waiting = max_waiting
        self.slots = slots
        self._waiting: deque[Ticket] = deque()
        self._running: set[Ticket] = set()
        self.closed = False
        self._idle = asyncio.Event()  # set while nothing runs or waits
        self._idle.set()

    @property
    def waiting(self) -> int:
        """Requests admitted but not yet running (the queue depth)."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot (at most `slots`)."""
        return len(self._running)

    def reserve(self, request_id: str) -> Ticket:
        """Admit a request or raise `QueueFull` (`AdmissionClosed` once closed). The slot goes to it at once
        if nobody is ahead."""
        if self.closed:
            raise AdmissionClosed("the server is shutting down")
        ticket = Ticket(self, request_id)
        self._idle.clear()
        if len(self._running) < self.slots and not self._waiting:
            self._grant(ticket)
        elif len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"the request queue is full ({self.max_waiting} waiting)")
        else:
            self._waiting.append(ticket)
        return ticket

    def resize(self, slots: int) -> None:
        """Run up to `slots` requests at once from now on (the worker's count, known once it is ready). Waiting
        tickets take new slots at once; with fewer slots, running requests keep theirs and the next waiter starts
        when the running count is under the new number."""
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        while self._waiting and len(self._running) < self.slots:
            self._grant(self._waiting.popleft())

    def close(self) -> int:
        """Admit nothing more and end every waiting ticket's wait with AdmissionClosed; the running ones
        keep their slots. Returns how many waiting tickets were ended."""
        self.closed = True
        ended = 0
        while self._waiting:
            ticket = self._waiting.popleft()
            ticket.released = True
            ticket._turn.set_result(AdmissionClosed("the server is shutting down"))
            ended += 1
        self._update_idle()
        return ended

    async def wait_idle(self) -> None:
        """Return once no request runs or waits."""
        await self._idle.wait()

    def _grant(self, ticket: Ticket) -> None:
        self._running.add(ticket)
        ticket._turn.set_result(None)

    def _release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        if ticket in self._running:
            self._running.discard(ticket)
            if self._waiting and len(self._running) < self.slots:
                self._grant(self._waiting.popleft())
        else:
            self._waiting.remove(ticket)
        self._update_idle()

    def _update_idle(self) -> None:
        if not self._running and not self._waiting:
            self._idle.set()
