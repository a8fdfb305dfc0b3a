"""The worker's request loop: serve Submit/Abort messages against one engine, one request at a time.

(`engine_loop` picks this loop, or the BatchLoop of server/worker/batch_loop.py when the engine decodes several
requests together: max_num_seqs > 1.)

The same loop runs inside the worker process (production) and inside a thread (the in-process client used
by tests), so both clients share one definition of ordering, abort and error semantics:
- requests run in the order they were submitted (batch size 1);
- an Abort for the running request stops it within one draft level or one target layer: whoever reads
  the channel calls `notice(message)` as soon as a message arrives (the worker does it on a reader thread),
  which sets the running request's cancel flag that the engine checks inside its step. An Abort for a
  queued request drops it; the engine frees its state at the next `generate()`;
- while a request runs, a `Heartbeat` goes out at most every `HEARTBEAT_INTERVAL_S` seconds from inside
  the engine's step (its cancel checks), so the API process can tell a slow step from a hung one;
- a `ValueError` raised before the first event is the caller's fault (HTTP 400); any other failure is a
  500 for that request only, and the loop carries on with the next one, unless the device is lost
  (`device_is_lost`): then the loop ends and the worker with it, to be replaced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

from server.worker import ipc
from server.edge.request_id import log_suffix
from subspec_core.types import GenerationRequest, TokenEvent

logger = logging.getLogger(__name__)

# receive(timeout): the next message, waiting at most `timeout` seconds (None: forever); None if none came.
Receive = Callable[[float | None], "ipc.ToWorker | None"]
Send = Callable[["ipc.FromWorker"], None]

HEARTBEAT_INTERVAL_S = 1.0


class EngineLike(Protocol):
    """What the loop and the clients need from `subspec_core.engine.Engine`."""

    model_name: str
    max_model_len: int
    tokenizer: Any

    def generate(self, request: GenerationRequest, *, cancelled: Callable[[], bool] | None = None) -> Any:
        """Iterator[TokenEvent] with .close(); returns early once `cancelled()` answers True."""


def engine_loop(engine: EngineLike, *, receive: Receive, send: Send) -> EngineLoop:
    """The request loop for `engine`: a BatchLoop when its `batch_decoder()` gives a decoder (max_num_seqs > 1,
    no post-speculation), else the one-request-at-a-time EngineLoop (also for an engine without that method)."""
    open_batch = getattr(engine, "batch_decoder", None)
    batch = None if open_batch is None else open_batch()
    if batch is None:
        return EngineLoop(engine, receive=receive, send=send)
    from server.worker.batch_loop import BatchLoop  # imports the engine's cancel module: the worker side only

    return BatchLoop(engine, batch=batch, open_batch=open_batch, receive=receive, send=send)


def device_is_lost(exc: BaseException) -> bool:
    """Whether `exc` is a CUDA error the process cannot recover from (an illegal address, a device-side assert:
    the context is poisoned and every later call fails too). Then the loop must end, so that the worker exits and
    a fresh one, with a fresh context, replaces it; answering 500 forever would be worse. Out of memory is not one
    (torch.OutOfMemoryError is no AcceleratorError): the next request may well fit. By name: this module is
    imported without torch."""
    return any(cls.__name__ == "AcceleratorError" for cls in type(exc).__mro__)


class EngineLoop:
    """Runs submitted requests through `engine.generate`, honouring aborts inside engine steps."""

    def __init__(self, engine: EngineLike, *, receive: Receive, send: Send) -> None:
        self._engine = engine
        self._receive = receive
        self._send = send
        self._pending: deque[GenerationRequest] = deque()
        self._shutdown = False
        # (request id, cancel flag) of the running request, replaced as one value so that `notice` on
        # another thread can never set the flag of a request other than the one it read the id of.
        self._running: tuple[str, threading.Event] | None = None
        self._last_beat = 0.0

    @property
    def slots(self) -> int:
        """Requests it runs at once (reported in Ready: the API's admission slots)."""
        return 1

    def notice(self, message: ipc.ToWorker) -> None:
        """Thread-safe early look at an incoming message: an Abort of the running request (or a Shutdown)
        sets its cancel flag at once, while the engine is still inside a step. The message must still be
        delivered through `receive` as usual."""
        running = self._running
        if running is None:
            return
        if isinstance(message, ipc.Shutdown) or (isinstance(message, ipc.Abort) and message.request_id == running[0]):
            running[1].set()

    def run(self) -> None:
        """Serve messages until a Shutdown arrives (or the channel closes)."""
        while not self._shutdown:
            if not self._pending:
                self._handle(self._receive(None))
                continue
            self._run_one(self._pending.popleft())

    def _handle(self, message: ipc.ToWorker | None) -> None:
        if message is None:
            return
        if isinstance(message, ipc.Submit):
            self._pending.append(message.request)
        elif isinstance(message, ipc.Abort):
            running = self._running
            if running is not None and running[0] == message.request_id:
                running[1].set()
                return
            for request in self._pending:
                if request.request_id == message.request_id:
                    self._pending.remove(request)
                    self._send(ipc.Done(message.request_id))
                    break
        elif isinstance(message, ipc.Shutdown):
            self.notice(message)  # stops the running request
            self._shutdown = True
        else:
            raise TypeError(f"unexpected message for the worker: {message!r}")

    def _poll(self) -> None:
        """Take every message already waiting, without blocking (called between engine iterations)."""
        while True:
            message = self._receive(0)
            if message is None:
                return
            self._handle(message)

    def _cancel_check(self, request_id: str, flag: threading.Event) -> Callable[[], bool]:
        """What the engine asks between draft levels and target layers: stop? (and a throttled heartbeat)."""

        def cancelled() -> bool:
            now = time.monotonic()
            if now - self._last_beat >= HEARTBEAT_INTERVAL_S:
                self._last_beat = now
                self._send(ipc.Heartbeat(request_id))
            return flag.is_set()

        return cancelled

    def _run_one(self, request: GenerationRequest) -> None:
        request_id = request.request_id
        tag = log_suffix(request.correlation_id)
        flag = threading.Event()
        self._running = (request_id, flag)
        self._last_beat = time.monotonic()
        events = None
        emitted = finished = False
        started = time.perf_counter()
        try:
            events = self._engine.generate(request, cancelled=self._cancel_check(request_id, flag))
            for event in events:
                emitted = True
                self._send(ipc.Event(as_token_event(event)))
                if event.finished:
                    finished = True
                    log_finished(request_id, tag, event, time.perf_counter() - started)
                    break
                self._poll()
                if flag.is_set():
                    break
            if not finished:  # stopped between events, or the engine returned early from inside a step
                logger.info("request %s aborted%s", request_id, tag)
        except ValueError as exc:
            # Raised before any output, a ValueError is the engine rejecting the request (e.g. too long).
            status, kind = (500, "server_error") if emitted else (400, "invalid_request_error")
            logger.info("request %s rejected by the engine (%d): %s%s", request_id, status, exc, tag)
            self._send(ipc.Error(request_id, status, kind, str(exc)))
        except Exception as exc:  # one bad request must not take the worker down, unless the device is lost
            logger.exception("request %s failed in the engine%s", request_id, tag)
            self._send(ipc.Error(request_id, 500, "server_error", f"engine error: {type(exc).__name__}: {exc}"))
            if device_is_lost(exc):
                raise
        finally:
            if events is not None and hasattr(events, "close"):
                events.close()
            self._running = None
            self._send(ipc.Done(request_id))


def log_finished(request_id: str, tag: str, event: TokenEvent, seconds: float) -> None:
    """One log line for a finished request: its tokens, time and forwards."""
    stats = event.stats
    if stats is None:
        logger.info("request %s finished (%s) in %.2f s%s", request_id, event.finish_reason, seconds, tag)
        return
    logger.info("request %s finished (%s): %d prompt + %d generated tokens in %.2f s, %d target forwards, "
                "%.2f tokens per forward%s", request_id, event.finish_reason, stats.prompt_tokens,
                stats.completion_tokens, seconds, stats.iterations, stats.mean_accept_length, tag)


def as_token_event(event: Any) -> TokenEvent:
    """The engine's event, checked to be a TokenEvent (what crosses the pipe)."""
    if not isinstance(event, TokenEvent):
        raise TypeError(f"engine.generate must yield TokenEvent, got {type(event).__name__}")
    return event
