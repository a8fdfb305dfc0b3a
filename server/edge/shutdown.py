"""Graceful shutdown on SIGTERM / SIGINT.

uvicorn alone stops listening at once, waits a grace period, then cuts every connection: streams end with a
truncated chunked body, no error event and no `[DONE]`, even for queued requests that already got their 200.
Instead, the first signal starts a drain while the server keeps listening:
1. new requests get 503 `shutting_down` (with Retry-After), and /health answers 503 `draining`;
2. every queued request ends at once with that 503: an error response, or for a stream that already got
   its 200 a final `data: {"error": ...}` event and `data: [DONE]`;
3. the running request may finish for `timeout_s`; after that it is ended the same way;
4. then uvicorn's own shutdown runs: connections close, the app's lifespan ends, which stops the worker.
A second signal skips the rest of the drain (uvicorn's shutdown, bounded by its grace period); a third
Ctrl-C exits at once.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

from server.worker.admission import Admission
from server.worker.runner import JobRunner

logger = logging.getLogger(__name__)

# After the running request has been told to stop, the time its last frames get to reach the client.
_FLUSH_S = 5.0


class GracefulShutdown:
    """The app's side of a drain: stop admitting, end the queue, give the running request time, end it."""

    def __init__(self, *, admission: Admission, runner: JobRunner, timeout_s: float) -> None:
        self._admission = admission
        self._runner = runner
        self.timeout_s = timeout_s
        self.draining = False

    async def drain(self) -> None:
        """Run the drain (idempotent); returns when no request is left or the time is up."""
        if self.draining:
            return
        self.draining = True
        ended = self._admission.close()
        running = self._admission.running
        logger.warning("shutting down: %d queued request(s) ended; waiting up to %g s for %d running request(s)",
                       ended, self.timeout_s, running)
        if await self._idle_within(self.timeout_s):
            return
        logger.warning("shutdown timeout of %g s reached: ending the running request", self.timeout_s)
        self._runner.stop(f"the server shut down before this request finished (--shutdown-timeout "
                           f"{self.timeout_s:g} s)")
        if not await self._idle_within(_FLUSH_S):
            logger.error("a request did not end within %g s of being stopped", _FLUSH_S)

    async def _idle_within(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._admission.wait_idle()
            return True
        except TimeoutError:
            return False


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the app before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, *, shutdown: GracefulShutdown) -> None:
        super().__init__(config)
        self._shutdown = shutdown
        self._drain_signal: int | None = None
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_signal is None and not self.should_exit:
            self._drain_signal = sig  # a signal handler must not await: on_tick starts the drain
            return
        super().handle_exit(sig, frame)  # a second signal: uvicorn's shutdown now (a third Ctrl-C: exit)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_signal is not None and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain_then_exit(self._drain_signal))
        return await super().on_tick(counter)

    async def _drain_then_exit(self, sig: int) -> None:
        try:
            await self._shutdown.drain()
        except Exception:
            logger.exception("the drain failed; shutting down anyway")
        finally:
            super().handle_exit(sig, None)
