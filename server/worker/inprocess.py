"""`InProcessEngineClient`: the engine loop in a thread of the API process.

For unit tests (with a fake engine) and debugging: the engine shares the API process, so a crash in it
is a crash of the server. Production uses `ProcessEngineClient`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Callable

from server.worker import ipc
from server.worker.client import EngineNotReady, RoutingEngineClient, WorkerDied
from server.worker.loop import EngineLike, EngineLoop, engine_loop

logger = logging.getLogger(__name__)


class InProcessEngineClient(RoutingEngineClient):
    """Runs the engine loop in a thread of this process. For tests and debugging: the engine shares
    the API process, so use the process client in production."""

    def __init__(self, engine_factory: Callable[[], EngineLike]) -> None:
        super().__init__()
        self._engine_factory = engine_factory
        self._inbox: queue.Queue[ipc.ToWorker] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine_loop: EngineLoop | None = None
        self.engine: EngineLike | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name="subspec-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._ready = False
        self._send(ipc.Shutdown())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._fail_in_flight(EngineNotReady("the server is shutting down"))

    def _send(self, message: ipc.ToWorker) -> None:
        running_loop = self._engine_loop
        if running_loop is not None:
            running_loop.notice(message)  # an abort reaches the running request inside its engine step
        self._inbox.put(message)

    def _receive(self, timeout: float | None) -> ipc.ToWorker | None:
        try:
            return self._inbox.get(timeout=timeout) if timeout != 0 else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _deliver(self, message: ipc.FromWorker) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._on_message, message)
        except RuntimeError:  # the loop closed under us during shutdown
            pass

    def _thread_main(self) -> None:
        try:
            engine = self._engine_factory()
        except Exception as exc:
            logger.exception("engine failed to load")
            self._loop.call_soon_threadsafe(self._set_fatal, f"{type(exc).__name__}: {exc}")
            return
        self.engine = engine
        self._engine_loop = engine_loop(engine, receive=self._receive, send=self._deliver)
        self._deliver(ipc.Ready(engine.model_name, engine.max_model_len, pid=0, max_num_seqs=self._engine_loop.slots))
        try:
            self._engine_loop.run()
        except Exception as exc:
            logger.exception("engine loop crashed")
            self._loop.call_soon_threadsafe(self._set_fatal, f"{type(exc).__name__}: {exc}")

    def _set_fatal(self, message: str) -> None:
        self._ready = False
        self._fatal = self._last_error = message
        self._fail_in_flight(WorkerDied(f"the engine thread failed: {message}"))
        self._notify_state()

    def status(self) -> dict[str, Any]:
        state = "ready" if self._ready else ("failed" if self._fatal else "loading")
        return {"state": state, "worker_pid": None, "worker_restarts": 0, "last_error": self._last_error}
