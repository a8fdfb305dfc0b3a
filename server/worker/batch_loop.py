"""The worker's request loop with several requests in flight: one BatchDecoder iteration serves them all.

With max_num_seqs > 1 the engine decodes up to that many requests together (subspec_core/batch.py). This loop
keeps the message semantics of the one-at-a-time EngineLoop (server/worker/loop.py) and adds membership:
- a Submit is admitted at the next iteration boundary while the batch has room: its prompt chunks ride on the
  batch's own forwards (`admit`), or are prefilled in forwards of their own when it asks for prompt logprobs
  (`join`, which scores them);
- each step gives every member its own event, sent to its own stream; a finished member sends Done and frees
  its place for the next;
- an Abort (the API's abort, request timeout or client disconnect) makes that member leave between iterations,
  without touching the others; if every member is aborted, or the worker shuts down, the step in flight stops
  at its next draft level or layer (`step(stop=...)`) and is void;
- the stop check, asked before each draft level and layer, also sends the throttled Heartbeat, so the API's
  stall watchdog sees progress during a long streamed step;
- every request is batchable, a structured output (a constraint) included: its grammar masks only its own rows
  (subspec_core/batch.py). Queued requests are admitted oldest first (first come, first served). An engine with
  post-speculation has no BatchDecoder and gets the one-at-a-time EngineLoop instead (`engine_loop`);
- a ValueError from admitting a request is that request's 400; any other failure of a step fails every member
  with a 500 (whose fault it was is unknown) and the loop carries on with a fresh batch, unless the device is
  lost (`device_is_lost`): then the loop ends and the worker with it, to be replaced.
Each step also sends `Step(sequences, rows)`, what its target forward served (the `subspec_batch_size` and
`subspec_forward_rows` histograms).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from server.edge.request_id import log_suffix
from server.worker import ipc
from server.worker.loop import (
    HEARTBEAT_INTERVAL_S, EngineLike, EngineLoop, Receive, Send, as_token_event, device_is_lost, log_finished,
)
from subspec_core.cancel import CancelCheck, GenerationCancelled
from subspec_core.types import GenerationRequest, TokenEvent

logger = logging.getLogger(__name__)


class BatchLike(Protocol):
    """What the loop needs from `subspec_core.batch.BatchDecoder`."""

    @property
    def active(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    @property
    def has_room(self) -> bool: ...

    def admit(self, request: GenerationRequest, *, cancelled: CancelCheck | None = None) -> None: ...

    def join(self, request: GenerationRequest, *, cancelled: CancelCheck | None = None) -> TokenEvent: ...

    def step(self, *, stop: CancelCheck | None = None) -> list[TokenEvent]: ...

    def leave(self, request_id: str) -> bool: ...

    forward_rows: int  # rows of the last step's target forward


@dataclass
class _Member:
    """A request in the batch: its abort flag (set from the reader thread by `notice`) and log details."""

    request_id: str
    tag: str  # the HTTP request id, quoted in log lines
    started: float = field(default_factory=time.perf_counter)
    aborted: threading.Event = field(default_factory=threading.Event)


class BatchLoop(EngineLoop):
    """Serves Submit/Abort messages against a BatchDecoder over `engine`; see the module docstring."""

    def __init__(self, engine: EngineLike, *, batch: BatchLike, open_batch: Callable[[], Any], receive: Receive,
                 send: Send) -> None:
        """`batch`: the engine's decoder; `open_batch` makes a fresh one after a failed step."""
        super().__init__(engine, receive=receive, send=send)
        self._open_batch = open_batch
        self._batch = batch
        # read by `notice` on another thread: only looked up there, never iterated, so mutation here is safe
        self._members: dict[str, _Member] = {}
        self._stopping = threading.Event()  # a Shutdown was noticed: the step in flight stops at its next layer

    @property
    def slots(self) -> int:
        return self._batch.capacity

    def notice(self, message: ipc.ToWorker) -> None:
        if isinstance(message, ipc.Shutdown):
            self._stopping.set()
        elif isinstance(message, ipc.Abort):
            member = self._members.get(message.request_id)
            if member is not None:
                member.aborted.set()

    def run(self) -> None:
        """Serve messages until a Shutdown arrives (or the channel closes)."""
        try:
            while not self._shutdown:
                if not self._pending and not self._members:
                    self._handle(self._receive(None))
                    continue
                self._poll()  # Submits queue up, Aborts leave: an iteration boundary
                if self._shutdown:
                    break
                self._admit_waiting()
                if self._members:
                    self._step()
        finally:
            for request_id in list(self._members):
                self._let_go(request_id, "stopped by the worker's shutdown")

    # ------------------------------------------------------------------------------------ messages
    def _handle(self, message: ipc.ToWorker | None) -> None:
        if isinstance(message, ipc.Abort) and message.request_id in self._members:
            self._let_go(message.request_id, "aborted")
            return
        super()._handle(message)

    def _let_go(self, request_id: str, why: str) -> None:
        """A member leaves the batch without a final event (aborted, stopped): Done, its region free."""
        member = self._members.pop(request_id)
        self._batch.leave(request_id)
        logger.info("request %s %s%s", request_id, why, member.tag)
        self._send(ipc.Done(request_id))

    # ------------------------------------------------------------------------------------ joining
    def _admit_waiting(self) -> None:
        """Admit queued requests, oldest first, while the batch has room."""
        while self._pending and self._batch.has_room and not self._stopping.is_set():
            self._admit(self._pending.popleft())

    def _admit(self, request: GenerationRequest) -> None:
        request_id = request.request_id
        member = _Member(request_id, log_suffix(request.correlation_id))
        self._members[request_id] = member  # before any work: an Abort during join's prefill must find it
        try:
            if request.sampling.prompt_logprobs is None:
                self._batch.admit(request, cancelled=member.aborted.is_set)
                return
            check = self._member_check(request_id, member.aborted)
            self._emit(self._batch.join(request, cancelled=check))  # scores the prompt in forwards of its own
        except GenerationCancelled:  # aborted (or shut down) during join's prefill: nothing was admitted
            self._let_go(request_id, "aborted")
        except ValueError as exc:  # the engine rejects the request (e.g. too long): nothing was admitted
            self._fail(request_id, 400, "invalid_request_error", str(exc))
        except Exception as exc:
            logger.exception("request %s failed joining the batch%s", request_id, member.tag)
            self._fail(request_id, 500, "server_error", f"engine error: {type(exc).__name__}: {exc}")
            if device_is_lost(exc):
                raise

    def _member_check(self, request_id: str, aborted: threading.Event) -> CancelCheck:
        """join's check before each layer of its prefill: a heartbeat, and stop on its abort or a shutdown."""

        def cancelled() -> bool:
            self._beat(request_id)
            return aborted.is_set() or self._stopping.is_set()

        return cancelled

    # ------------------------------------------------------------------------------------ one iteration
    def _step(self) -> None:
        sequences = self._batch.active
        try:
            events = self._batch.step(stop=self._stop_check)
        except GenerationCancelled:  # void: a shutdown, or every member aborted (their Aborts arrive next poll)
            return
        except Exception as exc:  # one member's fault or the engine's: no way to tell, so every member fails
            logger.exception("a batched step failed; failing its %d request(s)", len(self._members))
            for request_id in list(self._members):
                self._fail(request_id, 500, "server_error", f"engine error: {type(exc).__name__}: {exc}")
            if device_is_lost(exc):
                raise
            self._batch = self._open_batch()
            return
        self._send(ipc.Step(sequences, self._batch.forward_rows))
        for event in events:
            self._emit(event)
        for request_id in [rid for rid, member in self._members.items() if member.aborted.is_set()]:
            self._let_go(request_id, "aborted")  # the decoder dropped it, or its Abort is still on the way

    def _stop_check(self) -> bool:
        """Asked before each draft level and layer of a step: a heartbeat, and stop when shutting down or no member
        wants the step any more."""
        members = list(self._members.values())
        if members:
            self._beat(members[0].request_id)
        return self._stopping.is_set() or all(member.aborted.is_set() for member in members)

    def _beat(self, request_id: str) -> None:
        now = time.monotonic()
        if now - self._last_beat >= HEARTBEAT_INTERVAL_S:
            self._last_beat = now
            self._send(ipc.Heartbeat(request_id))

    def _emit(self, event: TokenEvent) -> None:
        member = self._members.get(event.request_id)
        if member is None:  # it left while the step ran
            return
        self._send(ipc.Event(as_token_event(event)))
        if event.finished:
            del self._members[event.request_id]
            log_finished(event.request_id, member.tag, event, time.perf_counter() - member.started)
            self._send(ipc.Done(event.request_id))

    def _fail(self, request_id: str, status: int, kind: str, message: str) -> None:
        """A member fails: its Error, then Done (it is out of the batch: left, or never admitted)."""
        member = self._members.pop(request_id, None)
        self._batch.leave(request_id)
        if status < 500:
            logger.info("request %s rejected by the engine (%d): %s%s", request_id, status, message,
                        "" if member is None else member.tag)
        self._send(ipc.Error(request_id, status, kind, message))
        self._send(ipc.Done(request_id))
