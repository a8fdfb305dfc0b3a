"""SIGTERM under load against `subspec serve` with the real default model: every client gets a proper
ending, and the API process and its worker are gone within the shutdown timeout."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.server.conftest import REAL_ENGINE
from tests.server.server_harness import ServeProcess

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT = 3
LONG = {"messages": [{"role": "user", "content": "Count from one to one thousand."}], "max_tokens": 300,
        "ignore_eos": True, "temperature": 0}
SHORT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_under_load_ends_every_request_cleanly_and_the_process_tree_exits(tmp_path, default_model_path):
    server = ServeProcess(tmp_path, "shutdown", {**REAL_ENGINE, "server": {
        "max_queue": 8, "shutdown_timeout_s": SHUTDOWN_TIMEOUT}}).start()
    try:
        base = server.base_url
        url = f"{base}/v1/chat/completions"
        worker_pid = httpx.get(f"{base}/health").json()["worker_pid"]
        results: dict[str, Any] = {}
        first_token = threading.Event()

        def stream(key: str, body: dict) -> None:
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as response:
                payloads = []
                for line in response.iter_lines():
                    if line:
                        payloads.append(line[len("data: "):])
                        if len(payloads) == 2:
                            first_token.set()
                results[key] = (response.status_code, payloads)

        def post(key: str, body: dict) -> None:
            results[key] = httpx.post(url, json=body, timeout=120)

        threads = [threading.Thread(target=stream, args=("running", LONG))]
        threads[0].start()
        assert first_token.wait(120)  # the long stream is generating on the worker
        for i in range(3):
            threads.append(threading.Thread(target=stream, args=(f"stream{i}", SHORT)))
        for i in range(4):
            threads.append(threading.Thread(target=post, args=(f"post{i}", SHORT)))
        for thread in threads[1:]:
            thread.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health").json()["queue_depth"] < 7:
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.05)

        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for thread in threads:
            thread.join(60)
        server.process.wait(SHUTDOWN_TIMEOUT + 20)
        exited_after = time.monotonic() - signalled
        while alive(worker_pid) and time.monotonic() - signalled < SHUTDOWN_TIMEOUT + 20:
            time.sleep(0.05)
        gone_after = time.monotonic() - signalled
    finally:
        server.stop()

    status, payloads = results["running"]
    assert status == 200 and payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    last = json.loads(payloads[-2])
    assert last["error"]["code"] == "shutting_down", last  # ended at the timeout, with a reason
    assert any(json.loads(p).get("choices") for p in payloads[:-2])  # it had streamed tokens before that
    for i in range(3):
        status, payloads = results[f"stream{i}"]
        assert status == 200 and payloads[-1] == "[DONE]"  # queued streams already had their 200
        assert json.loads(payloads[-2])["error"]["code"] == "shutting_down"
    for i in range(4):
        response = results[f"post{i}"]
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert not alive(worker_pid), "the worker outlived the server"
    log = server.log()
    assert "shutting down: 7 queued request(s) ended" in log
    print(f"\nSIGTERM: API process exited after {exited_after:.1f} s, worker gone after {gone_after:.1f} s "
          f"(shutdown timeout {SHUTDOWN_TIMEOUT} s)")
    assert exited_after < SHUTDOWN_TIMEOUT + 12 and gone_after < SHUTDOWN_TIMEOUT + 12
