"""The process client with a fake engine in a real spawned worker: events, crashes, restarts, the abort
watchdog and start failures (each worker start is a fresh interpreter: ~1 s)."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import time

import httpx
import pytest

from server.app import create_app
from server.engine_client import EngineNotReady, WorkerDied
from server.process_client import ProcessEngineClient
from server.settings import ServerSettings
from subspec_core.types import GenerationRequest, SamplingParams
from tests.server.server_fakes import FailingEngineFactory, FakeTokenizer, make_fake_engine, render_reply
from tests.server.server_harness import UvicornThread

pytestmark = pytest.mark.anyio


def request(rid: str, prompt: str = "hi", **sampling) -> GenerationRequest:
    return GenerationRequest(rid, tuple(ord(c) for c in prompt), SamplingParams(**{"max_tokens": 10, **sampling}))


async def collect(client: ProcessEngineClient, req: GenerationRequest) -> str:
    async with client.submit(req) as stream:
        return "".join([event.text async for event in stream])


async def test_events_crash_restart_and_close():
    client = ProcessEngineClient(functools.partial(make_fake_engine, delay_s=0.01), log_level="WARNING")
    await client.start()
    try:
        info = await client.wait_ready(60)
        assert info.name == "fake-model" and info.max_model_len == 256
        first_pid = client.status()["worker_pid"]
        assert first_pid != os.getpid() and client.status()["state"] == "ready"
        assert await collect(client, request("a")) == render_reply(10)[0]

        with pytest.raises(WorkerDied) as died:  # the worker exits mid-request
            await collect(client, request("b", "EXIT_WORKER"))
        assert died.value.status_code == 500
        assert not client.is_ready() and client.status()["state"] == "restarting"
        with pytest.raises(EngineNotReady):
            client.submit(request("c"))

        await client.wait_ready(60)
        status = client.status()
        assert status["worker_pid"] != first_pid and status["worker_restarts"] == 1
        assert "exited with code 3" in status["last_error"]
        assert await collect(client, request("d")) == render_reply(10)[0]
    finally:
        await client.close()
    assert client.status()["state"] == "failed" and client.status()["worker_pid"] is None


async def test_an_unhonoured_abort_kills_and_replaces_the_worker():
    client = ProcessEngineClient(functools.partial(make_fake_engine, hang_s=60), abort_timeout_s=0.5,
                                 log_level="CRITICAL")
    await client.start()
    try:
        await client.wait_ready(60)
        pid = client.status()["worker_pid"]
        async with client.submit(request("hang", "HANG")) as stream:
            await anext(stream)
            await asyncio.sleep(0.3)  # the worker is now stuck in its next iteration
        # closing the stream sent the abort, which the stuck worker cannot honour
        started = time.monotonic()
        while client.status()["worker_restarts"] == 0:
            assert time.monotonic() - started < 10
            await asyncio.sleep(0.05)
        await client.wait_ready(60)
        assert client.status()["worker_pid"] != pid
        assert await collect(client, request("after")) == render_reply(10)[0]
    finally:
        await client.close()


async def test_a_worker_that_cannot_load_is_fatal_at_once():
    reasons: list[str] = []
    client = ProcessEngineClient(FailingEngineFactory(), on_fatal=reasons.append, log_level="CRITICAL")
    await client.start()
    try:
        with pytest.raises(EngineNotReady, match="no such model"):
            await client.wait_ready(60)
        assert client.status()["state"] == "failed" and client.status()["worker_restarts"] == 0
        assert reasons and "no such model" in reasons[0]
    finally:
        await client.close()


def test_killed_worker_over_http_in_flight_500_queued_resubmitted_health_recovers():
    """The brief's crash scenario through the app: kill the worker pid shown by /health while one request
    runs and another waits; the first gets a 500, the second runs on the replacement worker."""
    client = ProcessEngineClient(functools.partial(make_fake_engine, delay_s=0.02, chars_per_event=1),
                                 log_level="CRITICAL")
    app = create_app(settings=ServerSettings(max_queue=4), engine_client=client, tokenizer=FakeTokenizer(),
                     model_name="fake-model")
    with UvicornThread(app) as server:
        server.wait_healthy(60)
        url = f"{server.base_url}/v1/chat/completions"
        pid = httpx.get(f"{server.base_url}/health").json()["worker_pid"]
        results: dict[str, httpx.Response] = {}

        def post(key: str, max_tokens: int) -> threading.Thread:
            body = {"messages": [{"role": "user", "content": key}], "max_tokens": max_tokens, "ignore_eos": True}
            thread = threading.Thread(target=lambda: results.__setitem__(key, httpx.post(url, json=body, timeout=60)))
            thread.start()
            return thread

        running = post("running", 200)
        while app.state.admission.running == 0:
            time.sleep(0.01)
        queued = post("queued", 5)
        while app.state.admission.waiting == 0:
            time.sleep(0.01)
        while "subspec_generation_tokens_total 0.0" in httpx.get(f"{server.base_url}/metrics").text:
            time.sleep(0.01)  # until the running request has produced tokens on the worker
        os.kill(pid, signal.SIGKILL)
        running.join(30)
        assert results["running"].status_code == 500, results["running"].text
        assert results["running"].json()["error"]["code"] == "worker_died"
        health = httpx.get(f"{server.base_url}/health")
        assert health.status_code == 503 and health.json()["status"] == "restarting", health.text
        queued.join(60)
        assert results["queued"].status_code == 200, results["queued"].text  # not lost: ran on the new worker
        assert results["queued"].json()["choices"][0]["message"]["content"] == render_reply(5, ignore_eos=True)[0]
        health = httpx.get(f"{server.base_url}/health").json()
        assert health["worker_pid"] != pid and health["worker_restarts"] == 1
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert "subspec_worker_restarts_total 1.0" in metrics
