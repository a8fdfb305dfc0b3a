"""X-Request-Id: on every response (the client's echoed, else a new one), in error bodies, and in the log
lines of the worker (here the in-process engine loop) and of the API for that request."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from server.edge.request_id import accepted_request_id
from tests.server.server_fakes import FakeEngine
from tests.server.server_harness import UvicornThread
from tests.server.test_server_app import KEY, MSGS, make_app

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def base_url():
    with UvicornThread(make_app(FakeEngine(), api_key=KEY)) as server:
        server.wait_healthy()
        yield server.base_url


@pytest.mark.parametrize("method, path, body, headers, status", [
    ("POST", "/v1/chat/completions", {"messages": MSGS, "max_tokens": 3}, AUTH, 200),
    ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 3}, AUTH, 200),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True}, AUTH, 200),
    ("GET", "/health", None, {}, 200),
    ("GET", "/metrics", None, {}, 200),
    ("GET", "/v1/models", None, {}, 401),  # rejected by the key check, before any route
    ("POST", "/v1/chat/completions", {"messages": []}, AUTH, 400),  # rejected by validation
    ("POST", "/v1/responses", {"input": "x", "previous_response_id": "r"}, AUTH, 400),  # by the route
    ("GET", "/v2/nothing", None, AUTH, 404),
])
def test_every_response_echoes_the_clients_id(base_url, method, path, body, headers, status):
    response = httpx.request(method, base_url + path, json=body, headers={**headers, "X-Request-Id": "trace-42"})
    assert response.status_code == status
    assert response.headers["X-Request-Id"] == "trace-42"
    if status >= 400:
        assert response.json()["error"]["request_id"] == "trace-42"


def test_an_id_is_generated_when_none_or_an_unusable_one_is_sent(base_url):
    ids = [httpx.get(f"{base_url}/health").headers["X-Request-Id"] for _ in range(2)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
    for bad in ("has space", "x" * 129):
        assert re.fullmatch(r"[0-9a-f]{32}", httpx.get(f"{base_url}/health", headers={"X-Request-Id": bad})
                            .headers["X-Request-Id"])
    assert accepted_request_id("req_01:a/b") == "req_01:a/b" and accepted_request_id("naïve") is None


def test_the_worker_and_api_log_lines_for_a_request_carry_its_id(base_url, caplog):
    with caplog.at_level(logging.INFO):
        ok = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": MSGS, "max_tokens": 3},
                        headers={**AUTH, "X-Request-Id": "find-me-7"})
        failed = httpx.post(f"{base_url}/v1/chat/completions", headers={**AUTH, "X-Request-Id": "find-me-8"},
                            json={"messages": [{"role": "user", "content": "RAISE_RUNTIME"}], "max_tokens": 9})
    assert ok.status_code == 200 and failed.status_code == 500
    assert failed.json()["error"]["request_id"] == "find-me-8"
    completion_id = ok.json()["id"]
    worker = [r.getMessage() for r in caplog.records if r.name == "server.worker.loop"]
    api = [r.getMessage() for r in caplog.records if r.name == "server.worker.telemetry"]
    # the fixed part of each line keeps its format; the id ends it
    assert any(re.fullmatch(rf"request {completion_id} finished \(length\): .* \[X-Request-Id find-me-7\]", line)
               for line in worker), worker
    assert any(re.fullmatch(r"request chatcmpl-\w+ failed in the engine \[X-Request-Id find-me-8\]", line)
               for line in worker), worker
    assert any(re.fullmatch(rf"{completion_id}: status 200, .* \[X-Request-Id find-me-7\]", line) for line in api), api
