"""The process client with a fake engine in a real spawned worker: events, crashes, restarts, the abort
watchdog and start failures (each worker start is a fresh interpreter: ~1 s)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import threading
import time

import httpx
import pytest

from server.app import create_app
from server.worker.client import EngineNotReady, WorkerDied
from server.worker.process import ProcessEngineClient
from server.settings import ServerSettings
from subspec_core.types import GenerationRequest, SamplingParams
from tests.server.server_fakes import FailingEngineFactory, FakeTokenizer, make_fake_engine, render_reply
from tests.server.server_harness import UvicornThread, long_chat, post_in_thread, scrape_metrics, wait_for

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


@pytest.mark.parametrize("max_num_seqs", [1, 2])
def test_killed_worker_over_http_running_500_queued_resubmitted_health_recovers(max_num_seqs):
    """The brief's crash scenario through the app: kill the worker pid shown by /health while `max_num_seqs`
    requests run (decoded together when 2: the batched loop) and another waits; every running request gets a 500,
    the waiting one runs on the replacement worker."""
    client = ProcessEngineClient(functools.partial(make_fake_engine, max_num_seqs=max_num_seqs, delay_s=0.02,
                                                   chars_per_event=1), log_level="CRITICAL")
    app = create_app(settings=ServerSettings(max_queue=4), engine_client=client, tokenizer=FakeTokenizer(),
                     model_name="fake-model")
    with UvicornThread(app) as server:
        server.wait_healthy(60)
        url = f"{server.base_url}/v1/chat/completions"
        pid = httpx.get(f"{server.base_url}/health").json()["worker_pid"]
        results: dict[str, httpx.Response] = {}
        running = {f"r{i}": post_in_thread(url, long_chat(f"r{i}", 200), results, f"r{i}") for i in range(max_num_seqs)}
        wait_for(lambda: app.state.admission.running == max_num_seqs, 30, "the requests to run")
        queued = post_in_thread(url, long_chat("queued", 5), results, "queued")
        wait_for(lambda: app.state.admission.waiting == 1, 30, "the last request to queue")
        with httpx.Client(base_url=server.base_url) as http:  # until they have produced tokens on the worker
            wait_for(lambda: scrape_metrics(http)["subspec_generation_tokens_total"] >= 2 * max_num_seqs, 30, "tokens")
        os.kill(pid, signal.SIGKILL)
        for key, thread in running.items():
            thread.join(30)
            assert results[key].status_code == 500, results[key].text
            assert results[key].json()["error"]["code"] == "worker_died"
        health = httpx.get(f"{server.base_url}/health")
        assert health.status_code == 503 and health.json()["status"] == "restarting", health.text
        queued.join(60)
        assert results["queued"].status_code == 200, results["queued"].text  # not lost: ran on the new worker
        assert results["queued"].json()["choices"][0]["message"]["content"] == render_reply(5, ignore_eos=True)[0]
        health = httpx.get(f"{server.base_url}/health").json()
        assert health["worker_pid"] != pid and health["worker_restarts"] == 1
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert "subspec_worker_restarts_total 1.0" in metrics


@pytest.mark.parametrize("max_num_seqs", [1, 2])
def test_a_lost_device_ends_the_worker_and_a_fresh_one_serves_the_next_request(max_num_seqs):
    """A CUDA error that poisons the context (torch.AcceleratorError) fails its request with a 500 and ends the
    worker, serial or batched, instead of answering 500 to everything after it; the replacement serves."""
    client = ProcessEngineClient(functools.partial(make_fake_engine, max_num_seqs=max_num_seqs, delay_s=0.01),
                                 log_level="CRITICAL")
    app = create_app(settings=ServerSettings(), engine_client=client, tokenizer=FakeTokenizer(),
                     model_name="fake-model")
    with UvicornThread(app) as server:
        server.wait_healthy(60)
        url = f"{server.base_url}/v1/chat/completions"
        pid = httpx.get(f"{server.base_url}/health").json()["worker_pid"]
        lost = httpx.post(url, json={"messages": [{"role": "user", "content": "DEVICE_LOST"}]}, timeout=60)
        assert lost.status_code == 500, lost.text
        assert "AcceleratorError" in lost.json()["error"]["message"] or lost.json()["error"]["code"] == "worker_died"

        def replaced() -> bool:
            health = httpx.get(f"{server.base_url}/health")
            return health.status_code == 200 and health.json()["worker_pid"] not in (None, pid)

        wait_for(replaced, 60, "a fresh worker")
        assert httpx.get(f"{server.base_url}/health").json()["worker_restarts"] == 1
        ok = httpx.post(url, json=long_chat("after", 5), timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == render_reply(
            5, ignore_eos=True)[0]


def test_disconnect_frees_the_engine_within_one_level(tmp_path):
    """A streaming client leaves mid-iteration: its request stops within a level (counted in the worker's
    trace), so the next request starts a level later instead of when the whole iteration would have ended.
    The abort travels the production path: HTTP disconnect -> API abort -> pipe -> the worker's reader thread."""
    trace = tmp_path / "levels.txt"
    levels_per_event = 10  # 100 ms levels, 1 s iterations
    client = ProcessEngineClient(functools.partial(make_fake_engine, delay_s=1.0, levels_per_event=levels_per_event,
                                                   chars_per_event=1, trace_path=str(trace)), log_level="WARNING")
    app = create_app(settings=ServerSettings(max_queue=4), engine_client=client, tokenizer=FakeTokenizer(),
                     model_name="fake-model")

    def levels() -> list[tuple[str, int, int]]:
        return [(rid, int(event), int(level)) for rid, event, level in
                (line.split() for line in trace.read_text().splitlines())]

    with UvicornThread(app) as server:
        server.wait_healthy(60)
        url = f"{server.base_url}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=30) as response:
            lines = (line for line in response.iter_lines() if line)
            first = json.loads(next(lines)[len("data: "):])  # role chunk
            next(lines)  # the first event's text: iteration 0 is done
            while not [entry for entry in levels() if entry[1] == 1 and entry[2] == 3]:
                time.sleep(0.01)  # until the second iteration is 3 levels in
            at_disconnect = len(levels())
        next_request = httpx.post(url, json={"messages": [{"role": "user", "content": "next"}], "max_tokens": 1},
                                  timeout=30)
        assert next_request.status_code == 200, next_request.text
    trace_now = levels()
    aborted = [entry for entry in trace_now if entry[0] == first["id"]]
    after_disconnect = len(aborted) - at_disconnect
    assert after_disconnect <= 2, trace_now  # one level, plus the one started while the socket closed
    assert max(entry[2] for entry in aborted if entry[1] == aborted[-1][1]) < levels_per_event - 1  # cut mid-way
    assert [entry[0] for entry in trace_now[len(aborted):]] == [next_request.json()["id"]] * levels_per_event
    print(f"\nlevels run after the disconnect: {after_disconnect} (an iteration is {levels_per_event} levels)")


def test_a_hung_worker_turns_health_503_is_killed_and_replaced_queued_requests_survive():
    """Steps longer than the heartbeat timeout are fine while the engine reports progress from inside them;
    a worker that goes silent (SIGSTOP) with a request running is declared hung within the timeout, /health
    answers 503, the worker is killed and replaced, the running request gets a 500, the queued one runs."""
    timeout = 2.0
    client = ProcessEngineClient(functools.partial(make_fake_engine, delay_s=3.0, levels_per_event=60,
                                                   chars_per_event=1), heartbeat_timeout_s=timeout,
                                 log_level="CRITICAL")
    app = create_app(settings=ServerSettings(max_queue=4), engine_client=client, tokenizer=FakeTokenizer(),
                     model_name="fake-model")
    with UvicornThread(app) as server:
        server.wait_healthy(60)
        url = f"{server.base_url}/v1/chat/completions"
        pid = httpx.get(f"{server.base_url}/health").json()["worker_pid"]
        slow = httpx.post(url, json={"messages": [{"role": "user", "content": "slow"}], "max_tokens": 1}, timeout=30)
        assert slow.status_code == 200, slow.text  # one 3 s step > the 2 s timeout: heartbeats kept it alive
        assert httpx.get(f"{server.base_url}/health").json()["worker_restarts"] == 0
        results: dict[str, httpx.Response] = {}

        running = post_in_thread(url, long_chat("running", 50), results, "running")
        while app.state.admission.running == 0:
            time.sleep(0.01)
        queued = post_in_thread(url, long_chat("queued", 1), results, "queued")
        while app.state.admission.waiting == 0:
            time.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            while (health := httpx.get(f"{server.base_url}/health")).status_code == 200:
                assert time.monotonic() - stopped < timeout + 3, "the hung worker was never noticed"
                time.sleep(0.05)
            noticed = time.monotonic() - stopped
            assert timeout - 0.5 <= noticed <= timeout + 1.5, noticed
            assert health.json()["status"] in ("stalled", "restarting"), health.text
            running.join(30)
            error = results["running"].json()["error"]
            assert results["running"].status_code == 500 and "no progress" in error["message"], error
            queued.join(60)
            assert results["queued"].status_code == 200, results["queued"].text  # not lost
            health = httpx.get(f"{server.base_url}/health")
            assert health.status_code == 200 and health.json()["worker_pid"] != pid
            assert health.json()["worker_restarts"] == 1 and "no progress" in health.json()["last_error"]
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(f"\nhung worker noticed after {noticed:.2f} s (timeout {timeout} s)")


def test_a_silent_worker_is_reported_stalled_within_seconds_and_ok_again_when_it_resumes(monkeypatch):
    """/health turns 503 `stalled` (with Retry-After) soon after the worker's last sign of life, long before the
    kill at the heartbeat timeout; a worker that resumes is `ok` again and its request completes."""
    monkeypatch.setattr("server.worker.process.STALL_REPORT_S", 1.0)
    client = ProcessEngineClient(functools.partial(make_fake_engine, delay_s=0.05, chars_per_event=1),
                                 heartbeat_timeout_s=60, log_level="CRITICAL")
    app = create_app(settings=ServerSettings(), engine_client=client, tokenizer=FakeTokenizer(),
                     model_name="fake-model")
    with UvicornThread(app) as server:
        server.wait_healthy(60)
        pid = httpx.get(f"{server.base_url}/health").json()["worker_pid"]
        results: dict[str, httpx.Response] = {}
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "ignore_eos": True}
        thread = threading.Thread(target=lambda: results.__setitem__("r", httpx.post(
            f"{server.base_url}/v1/chat/completions", json=body, timeout=60)))
        thread.start()
        while app.state.admission.running == 0:
            time.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            while (health := httpx.get(f"{server.base_url}/health")).status_code == 200:
                assert time.monotonic() - stopped < 5, "the silent worker was never reported"
                time.sleep(0.05)
            assert health.json()["status"] == "stalled" and health.headers["Retry-After"], health.text
        finally:
            os.kill(pid, signal.SIGCONT)
        thread.join(60)
        assert results["r"].status_code == 200, results["r"].text
        health = httpx.get(f"{server.base_url}/health")
        assert health.status_code == 200 and health.json()["worker_pid"] == pid  # not killed
