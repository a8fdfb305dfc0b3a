"""The one boundary between the HTTP layer and the engine: `EngineClient`.

`submit(request)` returns a `RequestStream` (an async iterator of `TokenEvent`s that aborts the request
when closed early), `abort`, readiness and model info. Two implementations share the routing of worker
messages to streams (`RoutingEngineClient`):
- `InProcessEngineClient` (server/worker/inprocess.py) runs the engine loop in a thread of this process
  (unit tests, debugging);
- `ProcessEngineClient` (server/worker/process.py) runs it in a spawned worker process that owns the GPU.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from server.worker import ipc
from subspec_core.types import GenerationRequest, TokenEvent

logger = logging.getLogger(__name__)


class EngineError(Exception):
    """A request failed in or on the way to the engine; carries what the HTTP client should see."""

    def __init__(self, message: str, *, status_code: int = 500, error_type: str = "server_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.code = code


class EngineNotReady(EngineError):
    """The worker is loading or restarting (503), or failed for good."""

    def __init__(self, message: str = "the engine worker is not ready; retry shortly") -> None:
        super().__init__(message, status_code=503, error_type="server_error", code="engine_not_ready")


class WorkerDied(EngineError):
    """The worker process exited while this request was in flight (500)."""

    def __init__(self, message: str = "the engine worker exited while running this request") -> None:
        super().__init__(message, status_code=500, error_type="server_error", code="worker_died")


@dataclass(frozen=True)
class ModelInfo:
    """What the worker reported once its engine was loaded."""

    name: str
    max_model_len: int
    max_num_seqs: int = 1  # requests the worker runs at once


_END = object()  # ends a stream without a final event (the request was aborted)


class RequestStream:
    """The events of one submitted request, in order. Close it (or use `async with`) when done: closing
    an unfinished stream aborts the request on the worker. Raises `EngineError` if the request fails."""

    def __init__(self, request_id: str, on_close: Callable[[str, bool], None]) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._on_close = on_close
        self._finished = False
        self._closed = False

    def put(self, item: TokenEvent | EngineError | object) -> None:
        """Deliver an event, an error or the end marker (called on the event loop by the client)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, EngineError):
            self._finished = True
            raise item
        if item.finished:
            self._finished = True
        return item

    def close(self) -> None:
        """Stop listening; aborts the request if it has not finished. Synchronous, so it is safe to call
        from `finally` blocks during cancellation."""
        if self._closed:
            return
        self._closed = True
        self._on_close(self.request_id, self._finished)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class EngineClient(ABC):
    """Submit/abort/ready: everything the HTTP layer may ask of the engine."""

    @abstractmethod
    async def start(self) -> None:
        """Start the worker (returns at once; it becomes ready later)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the worker and fail anything still in flight."""

    @abstractmethod
    def is_ready(self) -> bool:
        """True while a worker with a loaded engine is serving."""

    @abstractmethod
    async def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        """Wait until a worker is ready; raises `EngineNotReady` if it failed for good or on timeout."""

    @property
    @abstractmethod
    def model_info(self) -> ModelInfo | None:
        """Model name and context length reported by the last ready worker."""

    @abstractmethod
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue `request` on the worker; raises `EngineNotReady` if no worker is ready."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a submitted request at the worker's next iteration."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """Plain data for /health and /metrics: state, worker pid, restarts, last error."""

    @abstractmethod
    def on_step(self, listener: Callable[[ipc.Step], None]) -> None:
        """Call `listener(step)` for each batched iteration the worker reports (max_num_seqs > 1)."""

    @abstractmethod
    def on_worker_ready(self, listener: Callable[[ModelInfo], None]) -> None:
        """Call `listener(info)` on the event loop each time a worker reports ready (a replacement too)."""


class RoutingEngineClient(EngineClient):
    """Shared part of both clients: route worker messages to per-request streams; track readiness.

    Subclasses call `_on_message` on the event loop for every message from the worker and implement
    `_send` (to the worker). All state here is touched only from the event loop thread.
    """

    def __init__(self) -> None:
        self._streams: dict[str, RequestStream] = {}
        self._info: ModelInfo | None = None
        self._ready = False
        self._fatal: str | None = None  # set when no worker will come back: wait_ready fails at once
        self._last_error: str | None = None
        self._state_changed = asyncio.Event()
        self._step_listeners: list[Callable[[ipc.Step], None]] = []
        self._ready_listeners: list[Callable[[ModelInfo], None]] = []

    def on_step(self, listener: Callable[[ipc.Step], None]) -> None:
        """Call `listener(step)` for each batched iteration the worker reports (max_num_seqs > 1)."""
        self._step_listeners.append(listener)

    def on_worker_ready(self, listener: Callable[[ModelInfo], None]) -> None:
        """Call `listener(info)` on the event loop each time a worker reports ready (a replacement too)."""
        self._ready_listeners.append(listener)

    @abstractmethod
    def _send(self, message: ipc.ToWorker) -> None:
        """Send a message to the current worker without blocking the event loop."""

    # -- readiness ------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        return self._ready

    @property
    def model_info(self) -> ModelInfo | None:
        return self._info

    async def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        async with asyncio.timeout(timeout):
            while True:
                if self._fatal is not None:
                    raise EngineNotReady(f"the engine worker failed: {self._fatal}")
                if self._ready and self._info is not None:
                    return self._info
                await self._state_changed.wait()

    def _notify_state(self) -> None:
        """Wake every `wait_ready` caller (they re-check the state)."""
        self._state_changed.set()
        self._state_changed = asyncio.Event()

    # -- requests -------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestStream:
        if not self._ready:
            raise EngineNotReady()
        if request.request_id in self._streams:
            raise ValueError(f"duplicate request id {request.request_id}")
        stream = RequestStream(request.request_id, self._on_stream_closed)
        self._streams[request.request_id] = stream
        self._send(ipc.Submit(request))
        return stream

    def abort(self, request_id: str) -> None:
        """Stop the request on the worker; its stream ends without a final event."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(_END)
            self._send(ipc.Abort(request_id))
            self._on_abort_sent(request_id)

    def _on_stream_closed(self, request_id: str, finished: bool) -> None:
        if not finished:
            self.abort(request_id)  # a no-op if the request already ended (finished or failed)

    def _on_abort_sent(self, request_id: str) -> None:
        """Hook: the process client starts an abort watchdog here."""

    def _on_message(self, message: ipc.FromWorker) -> None:
        """Route one worker message (call on the event loop)."""
        if isinstance(message, ipc.Event):
            stream = self._streams.get(message.event.request_id)
            if stream is not None:
                stream.put(message.event)
                if message.event.finished:
                    self._streams.pop(message.event.request_id, None)
        elif isinstance(message, ipc.Error):
            stream = self._streams.pop(message.request_id, None)
            if stream is not None:
                stream.put(EngineError(message.message, status_code=message.status_code,
                                       error_type=message.error_type))
        elif isinstance(message, ipc.Done):
            self._on_done(message.request_id)
        elif isinstance(message, ipc.Step):
            for listener in self._step_listeners:
                listener(message)
        elif isinstance(message, ipc.Heartbeat):
            pass  # progress only: the process client's stall watchdog counts every message
        elif isinstance(message, ipc.Ready):
            self._info = ModelInfo(message.model_name, message.max_model_len, message.max_num_seqs)
            self._ready = True
            logger.info("engine worker ready (pid %s): model %s, max_model_len %s, max_num_seqs %s",
                        message.pid, message.model_name, message.max_model_len, message.max_num_seqs)
            for listener in self._ready_listeners:
                listener(self._info)
            self._notify_state()
        elif isinstance(message, ipc.Fatal):
            logger.error("engine worker failed to start: %s", message.message)
            self._last_error = message.message
        else:
            raise TypeError(f"unexpected message from the worker: {message!r}")

    def _on_done(self, request_id: str) -> None:
        """Hook: the worker has let go of `request_id`."""

    def _fail_in_flight(self, error: EngineError) -> None:
        """Every submitted, unfinished request gets `error` (e.g. the worker died)."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)
