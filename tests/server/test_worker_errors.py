"""The engine worker reports a model that cannot be read in one line: its Fatal message and its log, no traceback."""

from __future__ import annotations

import logging
import signal
from multiprocessing import Pipe

import pytest

from server.worker import ipc
from server.worker.main import worker_main
from subspec_core.model_source import ModelSourceError

LINE = "model org/missing: no such local path, nor a repository on the hub at http://127.0.0.1:9"


def cannot_read_the_model() -> None:
    raise ModelSourceError(LINE)


def test_a_model_that_cannot_be_read_is_one_line_from_the_worker(caplog):
    inbox, _ = Pipe(duplex=False)
    from_worker, outbox = Pipe(duplex=False)
    sigint = signal.getsignal(signal.SIGINT)  # worker_main ignores Ctrl-C (the API process decides)
    try:
        with caplog.at_level(logging.ERROR, logger="server.worker.main"), pytest.raises(SystemExit) as exited:
            worker_main(cannot_read_the_model, inbox, outbox)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert exited.value.code == 1
    assert from_worker.recv() == ipc.Fatal(LINE)  # the API process logs it as the reason, unprefixed
    [record] = [r for r in caplog.records if r.name == "server.worker.main"]
    assert record.getMessage() == f"engine failed to load: {LINE}" and record.exc_info is None
