"""The engine worker process: the only process that imports the engine (and so torch and CUDA).

`ProcessEngineClient` spawns `worker_main` with a picklable engine factory (normally
`functools.partial(load_engine, config)`) and the worker's ends of two one-way pipes. This module's top
level stays free of torch so the API process can import it to name the spawn target.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from multiprocessing.connection import Connection
from typing import Callable

from server.worker import ipc
from server.worker.loop import EngineLike, EngineLoop, engine_loop
from subspec_core.config import EngineConfig
from subspec_core.errors import SetupError
from subspec_core.startup import quiet_third_party_warnings

logger = logging.getLogger(__name__)


def load_engine(config: EngineConfig) -> EngineLike:
    """Build the real engine and warm it up (runs in the worker process: imports torch, may initialise CUDA).
    Each start-up phase is logged in one line with its duration."""
    from subspec_core.build import build_engine
    from subspec_core.startup import StartupLog, warm_up

    phases = StartupLog()
    engine = build_engine(config, progress=False, phases=phases)
    with phases.phase("warm up") as phase:
        phase.detail = warm_up(engine)
    phases.note(f"engine ready in {phases.elapsed_s:.1f} s")
    return engine


def worker_main(engine_factory: Callable[[], EngineLike], inbox: Connection, outbox: Connection,
                log_level: str = "INFO") -> None:
    """Entry point of the spawned worker: load the engine, report Ready (or Fatal), serve until Shutdown
    or until the API process goes away (its end of `inbox` closes).

    A reader thread drains `inbox` while the engine runs, so an Abort (or Shutdown) reaches the running
    request's cancel flag at once, inside an engine step, instead of when the step ends."""
    # Ctrl-C reaches the whole process group; the API process decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s [worker] %(name)s: %(message)s")
    quiet_third_party_warnings()

    try:
        engine = engine_factory()
    except SetupError as exc:  # the message is the whole story: no traceback
        logger.error("engine failed to load: %s", exc)
        outbox.send(ipc.Fatal(str(exc)))
        raise SystemExit(1) from exc
    except BaseException as exc:
        logger.exception("engine failed to load")
        outbox.send(ipc.Fatal(f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
    received: queue.Queue[ipc.ToWorker] = queue.Queue()

    def receive(timeout: float | None) -> ipc.ToWorker | None:
        try:
            return received.get(timeout=timeout) if timeout != 0 else received.get_nowait()
        except queue.Empty:
            return None

    loop = engine_loop(engine, receive=receive, send=outbox.send)
    threading.Thread(target=_read_inbox, args=(inbox, loop, received), name="subspec-worker-inbox",
                     daemon=True).start()
    outbox.send(ipc.Ready(model_name=engine.model_name, max_model_len=engine.max_model_len, pid=os.getpid(),
                          max_num_seqs=loop.slots))
    try:
        loop.run()
    finally:
        logger.info("worker shutting down")
        close = getattr(engine, "close", None)  # the real engine waits for in-flight copies, then frees
        if close is not None:
            close()


def _read_inbox(inbox: Connection, loop: EngineLoop, received: queue.Queue[ipc.ToWorker]) -> None:
    """Reader thread: show each message to the loop at once (`notice`), then queue it for the loop."""
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):  # the API process is gone
            message = ipc.Shutdown()
        loop.notice(message)
        received.put(message)
        if isinstance(message, ipc.Shutdown):
            return
