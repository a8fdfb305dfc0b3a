"""The worker's request loop run in a thread against a fake engine, with queues standing for its channel: what
the loop tests of one request at a time (test_server_engine_loop.py) and several (test_server_batch.py) drive."""

from __future__ import annotations

import queue
import threading

from server.worker import ipc
from server.worker.loop import engine_loop
from subspec_core.types import GenerationRequest, SamplingParams
from tests.server.server_fakes import FakeEngine


def request(rid: str, prompt: str = "hello", **sampling) -> GenerationRequest:
    return GenerationRequest(rid, tuple(ord(c) for c in prompt), SamplingParams(**{"max_tokens": 12, **sampling}))


class Harness:
    """The loop `engine_loop` picks for `engine`, in a thread, with queues for its channel."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.loop = engine_loop(engine, receive=self.receive, send=self.outbox.put)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()
        self.seen: list = []

    def receive(self, timeout):
        try:
            return self.inbox.get(timeout=timeout) if timeout != 0 else self.inbox.get_nowait()
        except queue.Empty:
            return None

    def send(self, message) -> None:
        self.loop.notice(message)  # as the worker's reader thread does
        self.inbox.put(message)

    def until(self, predicate) -> list:
        """Messages up to and including the first for which `predicate` holds (all of them kept in `seen`)."""
        while True:
            message = self.outbox.get(timeout=10)
            self.seen.append(message)
            if predicate(message):
                return self.seen

    def until_done(self, *rids: str) -> list:
        left = set(rids)
        return self.until(lambda m: isinstance(m, ipc.Done) and (left.discard(m.request_id) or not left))

    def shutdown(self) -> None:
        self.send(ipc.Shutdown())
        self.thread.join(10)
        assert not self.thread.is_alive()
