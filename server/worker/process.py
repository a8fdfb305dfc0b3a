"""`ProcessEngineClient`: the engine runs in a spawned worker process that owns the GPU.

The API process never imports torch (a test asserts it): it talks to the worker over two one-way pipes with the
typed messages of `server.worker.ipc`. A reader thread turns worker messages into calls on the event loop; a sender
thread keeps pipe writes off the event loop. When the worker dies, requests in flight fail with a 500,
requests still waiting in the API's queue simply wait for the replacement worker, and a new worker is
spawned (with back-off if replacements keep failing to start). Two watchdogs keep a stuck engine from
holding the GPU: a worker that sends nothing (no event, no heartbeat) while it has a request is reported as
`stalled` after `STALL_REPORT_S` and killed after `heartbeat_timeout_s` (a hung or stopped process), and an
abort it does not honour within `abort_timeout_s` kills it too.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from server.worker import ipc
from server.worker.client import EngineNotReady, RoutingEngineClient, WorkerDied
from server.worker.loop import EngineLike
from server.worker.main import worker_main

logger = logging.getLogger(__name__)

STALL_REPORT_S = 5.0


@dataclass(eq=False)
class _Worker:
    """One incarnation of the worker process, with the API's ends of its pipes."""

    process: BaseProcess
    to_worker: Connection
    from_worker: Connection
    outbox: queue.Queue[Any] = field(default_factory=queue.Queue)  # None stops the sender thread
    ready: bool = False
    fatal: str | None = None  # what the worker said before exiting, if it could not load
    killed_because: str | None = None  # set when a watchdog killed it


def _stop_process(process: BaseProcess, timeout: float) -> None:
    """Wait for a process to exit; terminate, then kill it if it does not."""
    process.join(timeout)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


class ProcessEngineClient(RoutingEngineClient):
    """EngineClient backed by one spawned worker process, restarted when it dies."""

    def __init__(self, engine_factory: Callable[[], EngineLike], *, log_level: str = "INFO",
                 restart: bool = True, max_start_failures: int = 3, abort_timeout_s: float = 300.0,
                 heartbeat_timeout_s: float | None = 60.0, on_fatal: Callable[[str], None] | None = None) -> None:
        """`engine_factory` must be picklable (e.g. `functools.partial(load_engine, config)`): it is
        called in the worker. `on_fatal` is called once if no worker can be started any more (`on_worker_ready`
        registers what to call each time one reports its engine loaded).
        `heartbeat_timeout_s`: kill a worker that reports nothing for this long while it has work (None: never)."""
        super().__init__()
        self._engine_factory = engine_factory
        self._log_level = log_level
        self._restart = restart
        self._max_start_failures = max_start_failures
        self._abort_timeout_s = abort_timeout_s
        self._on_fatal = on_fatal
        self._context = mp.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: _Worker | None = None
        self._ever_ready = False
        self._failed_starts = 0
        self._restarts = 0
        self._closing = False
        self._watchdogs: dict[str, asyncio.TimerHandle] = {}
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._in_flight: set[str] = set()  # submitted to the current worker, no Done yet (aborted ones too)
        self._last_progress = 0.0  # loop time of the last message from the current worker
        self._stall_check: asyncio.TimerHandle | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn()
        if self._heartbeat_timeout_s is not None:
            self._schedule_stall_check()

    async def close(self) -> None:
        self._closing = True
        self._ready = False
        self._fatal = "the server is shutting down"
        worker, self._worker = self._worker, None
        self._cancel_watchdogs()
        if self._stall_check is not None:
            self._stall_check.cancel()
        if worker is not None:
            worker.outbox.put(ipc.Shutdown())
            await asyncio.to_thread(_stop_process, worker.process, 10)
            worker.outbox.put(None)
        self._fail_in_flight(EngineNotReady("the server is shutting down"))
        self._notify_state()

    def _spawn(self) -> None:
        to_worker_recv, to_worker_send = self._context.Pipe(duplex=False)
        from_worker_recv, from_worker_send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=worker_main, name="subspec-worker",
            args=(self._engine_factory, to_worker_recv, from_worker_send, self._log_level),
        )
        process.start()
        # Drop our copies of the worker's ends: EOF then tells each side that the other is gone.
        to_worker_recv.close()
        from_worker_send.close()
        worker = _Worker(process, to_worker_send, from_worker_recv)
        self._worker = worker
        # If this client is dropped without close() (a crashed test), do not leave the worker running.
        weakref.finalize(worker, _stop_process, process, 0)
        threading.Thread(target=self._read, args=(worker,), name="subspec-worker-reader", daemon=True).start()
        threading.Thread(target=self._write, args=(worker,), name="subspec-worker-sender", daemon=True).start()
        logger.info("started engine worker pid %s", process.pid)

    def _respawn(self) -> None:
        if self._closing or self._worker is not None:
            return
        self._restarts += 1
        self._spawn()
        self._notify_state()

    # -- threads --------------------------------------------------------------------------------------
    def _read(self, worker: _Worker) -> None:
        """Reader thread: forward worker messages to the loop until the pipe closes (worker exit)."""
        try:
            while True:
                message = worker.from_worker.recv()
                self._call_on_loop(self._on_worker_message, worker, message)
        except (EOFError, OSError):
            pass
        worker.process.join(5)
        worker.outbox.put(None)
        self._call_on_loop(self._on_worker_exit, worker)

    @staticmethod
    def _write(worker: _Worker) -> None:
        """Sender thread: pipe writes can block while the worker is busy; keep them off the loop."""
        while (message := worker.outbox.get()) is not None:
            try:
                worker.to_worker.send(message)
            except (OSError, ValueError):  # the worker is gone; the reader thread reports it
                return

    def _call_on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    # -- on the event loop ----------------------------------------------------------------------------
    def _send(self, message: ipc.ToWorker) -> None:
        if self._worker is None:
            return
        if isinstance(message, ipc.Submit):
            assert self._loop is not None
            if not self._in_flight:  # the worker was idle: its progress clock starts now
                self._last_progress = self._loop.time()
            self._in_flight.add(message.request.request_id)
        self._worker.outbox.put(message)

    def _on_worker_message(self, worker: _Worker, message: ipc.FromWorker) -> None:
        if worker is not self._worker:
            return  # a message from a worker we already gave up on
        assert self._loop is not None
        self._last_progress = self._loop.time()  # every message, heartbeats included, is a sign of life
        if isinstance(message, ipc.Done):
            self._in_flight.discard(message.request_id)
        if isinstance(message, ipc.Ready):
            worker.ready = True
            self._ever_ready = True
            self._failed_starts = 0
        elif isinstance(message, ipc.Fatal):
            worker.fatal = message.message
        self._on_message(message)

    def _on_worker_exit(self, worker: _Worker) -> None:
        if worker is not self._worker or self._closing:
            return
        self._worker = None
        self._ready = False
        self._in_flight.clear()
        self._cancel_watchdogs()
        exitcode = worker.process.exitcode
        reason = (worker.fatal or worker.killed_because
                  or f"the engine worker (pid {worker.process.pid}) exited with code {exitcode}")
        self._last_error = reason
        logger.error("%s", reason)
        self._fail_in_flight(WorkerDied(f"the engine worker exited while running this request ({reason})"))
        if not worker.ready:
            self._failed_starts += 1
        # A worker that never loaded its first engine has a deterministic problem (bad model path,
        # not enough memory): do not retry it. Later failures to start are retried with back-off.
        gave_up = (not self._restart or (worker.fatal is not None and not self._ever_ready)
                   or self._failed_starts >= self._max_start_failures)
        if gave_up:
            self._fatal = reason
            self._notify_state()
            if self._on_fatal is not None:
                self._on_fatal(reason)
            return
        delay = 0.0 if self._failed_starts == 0 else min(2.0 ** self._failed_starts, 30.0)
        logger.warning("starting a new engine worker in %.0f s", delay)
        assert self._loop is not None
        self._loop.call_later(delay, self._respawn)
        self._notify_state()

    def _on_abort_sent(self, request_id: str) -> None:
        if self._worker is None or self._loop is None:
            return
        self._watchdogs[request_id] = self._loop.call_later(
            self._abort_timeout_s, self._abort_overdue, self._worker, request_id)

    def _on_done(self, request_id: str) -> None:
        handle = self._watchdogs.pop(request_id, None)
        if handle is not None:
            handle.cancel()

    def _abort_overdue(self, worker: _Worker, request_id: str) -> None:
        self._watchdogs.pop(request_id, None)
        if worker is self._worker and worker.process.is_alive():
            self._kill(worker, f"the engine worker (pid {worker.process.pid}) did not stop request {request_id} "
                               f"within {self._abort_timeout_s:g} s of its abort and was killed")

    def _schedule_stall_check(self) -> None:
        assert self._loop is not None and self._heartbeat_timeout_s is not None
        period = min(1.0, self._heartbeat_timeout_s / 4)
        self._stall_check = self._loop.call_later(period, self._check_progress)

    def _check_progress(self) -> None:
        """Stall watchdog: the worker has work but has said nothing for heartbeat_timeout_s."""
        assert self._loop is not None and self._heartbeat_timeout_s is not None
        worker = self._worker
        silent_for = self._loop.time() - self._last_progress
        if (worker is not None and worker.killed_because is None and self._in_flight
                and silent_for > self._heartbeat_timeout_s):
            self._kill(worker, f"the engine worker (pid {worker.process.pid}) made no progress for "
                               f"{silent_for:.0f} s (heartbeat timeout {self._heartbeat_timeout_s:g} s) and was killed")
        if not self._closing:
            self._schedule_stall_check()

    def _kill(self, worker: _Worker, reason: str) -> None:
        """Stop serving from `worker` at once (health turns 503) and kill it; its exit is handled as a crash
        (requests in flight fail, queued ones wait for the replacement)."""
        logger.error("%s", reason)
        worker.killed_because = reason
        self._last_error = reason
        self._ready = False
        self._notify_state()
        worker.process.kill()  # SIGKILL also ends a stopped (SIGSTOP) process

    def _cancel_watchdogs(self) -> None:
        for handle in self._watchdogs.values():
            handle.cancel()
        self._watchdogs.clear()

    def _silent_too_long(self) -> bool:
        """The worker has work but has reported nothing for STALL_REPORT_S (a heartbeat comes about every
        second from inside an engine step): /health says `stalled` long before the kill at the timeout."""
        if not self._in_flight or self._loop is None:
            return False
        limit = STALL_REPORT_S if self._heartbeat_timeout_s is None else min(STALL_REPORT_S, self._heartbeat_timeout_s)
        return self._loop.time() - self._last_progress > limit

    def status(self) -> dict[str, Any]:
        if self._ready:
            state = "stalled" if self._silent_too_long() else "ready"
        elif self._worker is not None and self._worker.killed_because is not None:
            state = "stalled"
        elif self._fatal is not None:
            state = "failed"
        else:
            state = "restarting" if self._ever_ready else "loading"
        worker = self._worker
        return {
            "state": state,
            "worker_pid": worker.process.pid if worker is not None else None,
            "worker_restarts": self._restarts,
            "last_error": self._last_error,
        }
