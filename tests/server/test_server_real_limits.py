"""Admission, deadlines and worker crashes with the real default model and the real worker process."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from tests.server.server_harness import post_in_thread, wait_for

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"messages": [{"role": "user", "content": "Count from one to one thousand."}], "max_tokens": 300,
        "ignore_eos": True, "temperature": 0}


def health(base_url: str) -> httpx.Response:
    return httpx.get(f"{base_url}/health", timeout=10)


def test_queue_full_gives_429_while_earlier_requests_complete(real_server_queue1):
    base = real_server_queue1.base_url
    url = f"{base}/v1/chat/completions"
    results: dict[str, httpx.Response] = {}
    with httpx.Client(timeout=300) as http:
        body = {**LONG, "max_tokens": 48, "stream": True}
        with http.stream("POST", url, json=body) as running:
            lines = (line for line in running.iter_lines() if line)
            next(lines)  # the first request holds the engine
            waiting = post_in_thread(url, {"messages": QUESTION, "max_tokens": 8, "temperature": 0}, results, "queued",
                                     timeout=300)
            wait_for(lambda: health(base).json()["queue_depth"] == 1, 30, "second request never queued")
            rejected = http.post(url, json={"messages": QUESTION, "max_tokens": 8})
            assert rejected.status_code == 429, rejected.text
            assert rejected.json()["error"]["code"] == "queue_full" and int(rejected.headers["Retry-After"]) >= 1
            payloads = [line[len("data: "):] for line in lines]
        assert payloads[-1] == "[DONE]"
        final = [json.loads(p) for p in payloads[:-1]][-1]
        assert final["choices"][0]["finish_reason"] == "length"  # the running request completed
        waiting.join(120)
        assert results["queued"].status_code == 200
        assert results["queued"].json()["choices"][0]["message"]["content"]
        assert http.post(url, json={"messages": QUESTION, "max_tokens": 2}).status_code == 200


def test_worker_crash_fails_in_flight_keeps_queued_and_recovers(real_server_queue1):
    """Kill the worker (its pid is in /health) while one request runs and one waits: the running one gets
    a 500, /health fails until a new worker is ready, and the waiting one then runs on it."""
    base = real_server_queue1.base_url
    url = f"{base}/v1/chat/completions"
    first = health(base).json()
    results: dict[str, httpx.Response] = {}
    running = post_in_thread(url, LONG, results, "running", timeout=300)
    wait_for(lambda: health(base).json()["running"] == 1, 30, "request never started")
    queued = post_in_thread(url, {"messages": QUESTION, "max_tokens": 8, "temperature": 0}, results, "queued",
                            timeout=300)
    wait_for(lambda: health(base).json()["queue_depth"] == 1, 30, "second request never queued")
    time.sleep(0.5)
    os.kill(first["worker_pid"], signal.SIGKILL)
    running.join(60)
    assert results["running"].status_code == 500
    assert results["running"].json()["error"]["code"] == "worker_died"
    down = health(base)
    assert down.status_code == 503 and down.json()["status"] == "restarting"
    queued.join(240)
    assert results["queued"].status_code == 200, results["queued"].text  # resubmitted to the new worker
    assert results["queued"].json()["choices"][0]["message"]["content"]
    up = health(base)
    assert up.status_code == 200
    assert up.json()["worker_pid"] != first["worker_pid"]
    assert up.json()["worker_restarts"] == first["worker_restarts"] + 1
    assert httpx.post(url, json={"messages": QUESTION, "max_tokens": 2}, timeout=120).status_code == 200


def test_deadline_ends_a_long_request_and_frees_the_engine(real_server_deadline):
    base = real_server_deadline.base_url
    url = f"{base}/v1/chat/completions"
    with httpx.Client(timeout=120) as http:
        started = time.monotonic()
        response = http.post(url, json=LONG)
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 10
        with http.stream("POST", url, json={**LONG, "stream": True}) as stream:
            payloads = [line[len("data: "):] for line in stream.iter_lines() if line]
        assert payloads[-1] == "[DONE]"
        last = json.loads(payloads[-2])
        assert last["error"]["code"] == "request_timeout" and "3 s" in last["error"]["message"]
        assert any(json.loads(p).get("choices") for p in payloads[:-2])  # tokens streamed before the deadline
        ok = http.post(url, json={"messages": QUESTION, "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200, ok.text
        metrics = http.get(f"{base}/metrics").text
        assert 'subspec_requests_total{endpoint="/v1/chat/completions",status="504"} 2.0' in metrics
