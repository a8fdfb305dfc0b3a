"""Running admitted requests: from a queue ticket to the engine's token events, within the request's deadline.

`JobRunner.events(job)` is the one path from an admitted request to the engine: wait for the GPU slot,
wait for a ready worker, submit, yield `TokenEvent`s. However it ends (finished, deadline, worker death,
client gone, server shutting down), it aborts the engine request if unfinished and releases the slot. The
slot is released when the engine is done with the request (its last event), not when the client has read
the reply, so a slow reader never holds the GPU. Failures are recorded here (their status is known here);
success and a vanished client are recorded by the caller, which knows when the reply was delivered.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, TypeVar

from server.api.errors import APIError
from server.worker.admission import AdmissionClosed, Ticket
from server.worker.client import EngineClient, EngineError
from server.worker.telemetry import RequestRecord
from subspec_core.types import GenerationRequest, RequestStats, SamplingParams, TokenEvent

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """An admitted request: what to run, its place in the queue, and its record."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    deadline: float | None  # event-loop time; None: no deadline
    ticket: Ticket
    record: RequestRecord
    correlation_id: str | None = None  # the HTTP request's X-Request-Id, quoted in log lines

    def seconds_left(self) -> float | None:
        """Time until the deadline (never negative); None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())


@dataclass(frozen=True)
class Completion:
    """A whole (non-streamed) result: its events in order, and what they add up to."""

    events: tuple[TokenEvent, ...]
    finish_reason: str
    completion_tokens: int
    stats: RequestStats | None = None

    @property
    def text(self) -> str:
        return "".join(event.text for event in self.events)


def shutting_down(message: str = "the server is shutting down; retry shortly (on another instance)") -> APIError:
    """The 503 of a request turned away or ended by a graceful shutdown."""
    return APIError(503, message, type="server_error", code="shutting_down", headers={"Retry-After": "5"})


def request_timeout(timeout_s: float | None, doing: str) -> APIError:
    return APIError(504, f"the request exceeded the server's request timeout of {timeout_s:g} s while {doing}; "
                         f"it was stopped", type="timeout_error", code="request_timeout")


class JobRunner:
    """Runs admitted jobs on the engine client; ends them all with a 503 when the server stops."""

    def __init__(self, client: EngineClient, *, request_timeout_s: float | None) -> None:
        self.client = client
        self.request_timeout_s = request_timeout_s
        self._stopping: asyncio.Future[str] | None = None  # resolves (to a message) when the server stops

    def stop(self, message: str) -> None:
        """End every running request with a 503 `message` (the last step of a graceful shutdown)."""
        stopping = self._stop_signal()
        if not stopping.done():
            stopping.set_result(message)

    def _stop_signal(self) -> asyncio.Future[str]:
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
        return self._stopping

    async def _bounded(self, awaitable: Awaitable[T], job: Job, doing: str) -> T:
        """`awaitable`'s result, unless the deadline passes (504) or the server stops (503) first."""
        stopping = self._stop_signal()
        if stopping.done():
            raise shutting_down(stopping.result())
        work = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({work, stopping}, timeout=job.seconds_left(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
        if work.done() and not work.cancelled():
            return work.result()
        if stopping.done():
            raise shutting_down(stopping.result())
        raise request_timeout(self.request_timeout_s, doing)

    async def events(self, job: Job) -> AsyncIterator[TokenEvent]:
        """Run one admitted job; yields its TokenEvents. Raises APIError (already recorded) when it fails."""
        stream = None
        try:
            await self._bounded(job.ticket.wait_turn(), job, "waiting in the queue")
            await self._bounded(self.client.wait_ready(), job, "waiting for the engine worker")
            job.record.on_start(len(job.prompt_ids))
            stream = self.client.submit(GenerationRequest(job.request_id, job.prompt_ids, job.sampling,
                                                          correlation_id=job.correlation_id))
            while True:
                try:
                    event = await self._bounded(anext(stream), job, "generating")
                except StopAsyncIteration:  # someone else aborted it through the engine client
                    raise APIError(500, "the request was aborted before it finished", type="server_error",
                                   code="aborted") from None
                job.record.on_event(event)
                if event.finished:
                    job.ticket.release()  # the engine is done: the next request may start while this one is sent
                yield event
                if event.finished:
                    return
        except AdmissionClosed:
            job.record.finish(503)
            raise shutting_down() from None
        except APIError as exc:
            job.record.finish(exc.status_code)
            raise
        except EngineError as exc:
            job.record.finish(exc.status_code)
            raise APIError(exc.status_code, exc.message, type=exc.error_type, code=exc.code) from exc
        finally:
            if stream is not None:
                stream.close()  # aborts the engine request if it has not finished
            job.ticket.release()

    async def collect(self, job: Job) -> Completion:
        """Run a job to the end and gather its events (the caller aborts it by cancelling)."""
        collected: list[TokenEvent] = []
        tokens = 0
        finish_reason = "stop"
        stats = None
        async with aclosing(self.events(job)) as events:  # cancelled: the job is aborted at once, not at GC
            async for event in events:
                collected.append(event)
                tokens += len(event.token_ids)
                if event.finished:
                    finish_reason = event.finish_reason or "stop"
                    stats = event.stats
                    if stats is not None and stats.completion_tokens:
                        tokens = stats.completion_tokens
        return Completion(tuple(collected), finish_reason, tokens, stats)


def deadline_from(timeout_s: float | None, arrival: float) -> float | None:
    """The event-loop time a request that arrived at `arrival` (time.monotonic) must end by: time spent
    validating and queueing counts."""
    if timeout_s is None:
        return None
    return asyncio.get_running_loop().time() + timeout_s - (time.monotonic() - arrival)
