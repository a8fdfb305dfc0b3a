"""Several requests in flight (max_num_seqs > 1): the worker's BatchLoop against a FakeBatch, and the HTTP layer
over it. Each request's events reach its own stream exactly as alone; joins, aborts and failures of one leave
the others untouched; heartbeats flow during a step; a structured output is a member like any other."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from server.app import create_app
from server.settings import ServerSettings
from server.worker import ipc
from server.worker.batch_loop import BatchLoop
from server.worker.inprocess import InProcessEngineClient
from server.worker.loop import EngineLoop, engine_loop
from subspec_core.grammar import regex_constraint
from tests.server.loop_harness import Harness, request
from tests.server.server_fakes import FakeEngine, FakeTokenizer, render_reply
from tests.server.server_harness import UvicornThread, long_chat, post_in_thread, scrape_metrics


def events_of(messages, rid):
    return [m.event for m in messages if isinstance(m, ipc.Event) and m.event.request_id == rid]


def text_of(messages, rid):
    return "".join(e.text for e in events_of(messages, rid))


def test_max_num_seqs_picks_the_batch_loop_and_one_keeps_the_serial_loop():
    assert type(engine_loop(FakeEngine(), receive=lambda t: None, send=lambda m: None)) is EngineLoop
    assert isinstance(engine_loop(FakeEngine(max_num_seqs=2), receive=lambda t: None, send=lambda m: None), BatchLoop)


def test_four_requests_decode_together_and_each_gets_its_solo_events():
    """Different prompts, lengths and stop strings: each request's text, finish reason and stats are its own, and
    the four shared steps (one Step message per iteration, carrying 4)."""
    h = Harness(FakeEngine(max_num_seqs=4, delay_s=0.01, chars_per_event=2))
    settings = {"a": {"max_tokens": 20}, "b": {"max_tokens": 7}, "c": {"max_tokens": 60, "ignore_eos": True},
                "d": {"max_tokens": 30, "stop": ("世界",)}}
    for rid, sampling in settings.items():
        h.send(ipc.Submit(request(rid, f"prompt of {rid}" * (1 + len(rid)), **sampling)))
    messages = h.until_done(*settings)
    for rid, sampling in settings.items():
        text, reason = render_reply(sampling["max_tokens"], sampling.get("stop", ()), sampling.get("ignore_eos", False))
        events = events_of(messages, rid)
        assert text_of(messages, rid) == text and events[-1].finish_reason == reason
        assert events[-1].stats is not None and all(not e.finished for e in events[:-1])
    steps = [m.sequences for m in messages if isinstance(m, ipc.Step)]
    # all four together (the loop may take a first step before the last Submit arrives), then fewer as they finish
    assert 4 in steps and steps[steps.index(4):] == sorted(steps[steps.index(4):], reverse=True)
    assert h.loop._batch.active == 0
    h.shutdown()


def test_a_newcomer_gets_its_first_token_before_any_of_three_running_requests_finishes():
    h = Harness(FakeEngine(max_num_seqs=4, delay_s=0.01, chars_per_event=1))
    for rid in ("r0", "r1", "r2"):
        h.send(ipc.Submit(request(rid, max_tokens=100, ignore_eos=True)))
    h.until(lambda m: isinstance(m, ipc.Event) and m.event.request_id == "r2")  # all three are generating
    h.send(ipc.Submit(request("late", "a late prompt", max_tokens=5)))
    messages = h.until(lambda m: isinstance(m, ipc.Event) and m.event.request_id == "late")
    assert not any(isinstance(m, ipc.Done) for m in messages)
    messages = h.until_done("r0", "r1", "r2", "late")
    assert text_of(messages, "late") == render_reply(5)[0]
    assert all(text_of(messages, rid) == render_reply(100, ignore_eos=True)[0] for rid in ("r0", "r1", "r2"))
    h.shutdown()


def test_an_abort_leaves_the_others_exact_and_frees_its_place():
    engine = FakeEngine(max_num_seqs=2, delay_s=0.01, chars_per_event=1)
    h = Harness(engine)
    h.send(ipc.Submit(request("kept", max_tokens=40, ignore_eos=True)))
    h.send(ipc.Submit(request("aborted", max_tokens=200, ignore_eos=True)))
    h.send(ipc.Submit(request("waiting", max_tokens=6)))  # no room until one leaves
    h.until(lambda m: isinstance(m, ipc.Event) and m.event.request_id == "aborted")
    h.send(ipc.Abort("aborted"))
    messages = h.until_done("kept", "aborted", "waiting")
    assert text_of(messages, "kept") == render_reply(40, ignore_eos=True)[0]
    assert text_of(messages, "waiting") == render_reply(6)[0]
    assert not any(e.finished for e in events_of(messages, "aborted"))
    assert len(events_of(messages, "aborted")) <= 3 and "aborted" in engine.closed_early
    done = [i for i, m in enumerate(messages) if isinstance(m, ipc.Done)]
    first_waiting = next(i for i, m in enumerate(messages)
                         if isinstance(m, ipc.Event) and m.event.request_id == "waiting")
    assert messages[done[0]].request_id == "aborted" and done[0] < first_waiting  # it took the aborted one's place
    h.shutdown()


def test_heartbeats_flow_during_a_long_step_and_shutdown_stops_it(monkeypatch):
    """A step of 3 s asks its stop check before each of its 30 levels: heartbeats go out during it, and a Shutdown
    ends it within a level."""
    import server.worker.batch_loop as batch_loop

    monkeypatch.setattr(batch_loop, "HEARTBEAT_INTERVAL_S", 0.05)
    h = Harness(FakeEngine(max_num_seqs=2, delay_s=3.0, levels_per_event=30))
    h.send(ipc.Submit(request("slow")))
    h.until(lambda m: isinstance(m, ipc.Heartbeat))
    h.until(lambda m: isinstance(m, ipc.Heartbeat))
    started = time.monotonic()
    h.shutdown()
    assert time.monotonic() - started < 1.0
    assert not any(isinstance(m, ipc.Event) for m in h.seen)


def test_a_request_for_prompt_logprobs_joins_with_its_first_event_at_once():
    """Prompt logprobs are scored by `join`'s own prefill: its first event (with them) comes before the next step."""
    h = Harness(FakeEngine(max_num_seqs=2, delay_s=0.01, chars_per_event=1))
    h.send(ipc.Submit(request("running", max_tokens=30)))
    h.until(lambda m: isinstance(m, ipc.Event) and m.event.request_id == "running")
    h.send(ipc.Submit(request("scored", "score me", max_tokens=3, prompt_logprobs=1)))
    messages = h.until_done("running", "scored")
    events = events_of(messages, "scored")
    assert events[0].prompt_logprobs is not None and len(events[0].prompt_logprobs) == len("score me") - 1
    assert text_of(messages, "scored") == render_reply(3)[0] and text_of(messages, "running") == render_reply(30)[0]
    h.shutdown()


def test_a_structured_output_joins_the_batch_beside_the_others():
    """A constrained request is admitted like any other, without waiting for the batch to empty: it decodes beside
    the request before it and the one after, and finishes first (the shortest)."""
    engine = FakeEngine(max_num_seqs=3, delay_s=0.01, chars_per_event=1)
    h = Harness(engine)
    h.send(ipc.Submit(request("first", max_tokens=30)))
    h.send(ipc.Submit(request("constrained", max_tokens=4, constraint=regex_constraint("[ab]+", "test"))))
    h.send(ipc.Submit(request("after", max_tokens=6)))
    messages = h.until_done("first", "constrained", "after")
    order = [m.request_id for m in messages if isinstance(m, ipc.Done)]
    assert order == ["constrained", "after", "first"]
    assert text_of(messages, "constrained") == render_reply(4)[0]
    steps = [m.sequences for m in messages if isinstance(m, ipc.Step)]
    assert max(steps) == 3  # all three in one forward
    h.shutdown()


def test_a_rejected_request_is_a_400_and_a_failed_step_fails_its_members_only():
    h = Harness(FakeEngine(max_num_seqs=3, delay_s=0.01, chars_per_event=1))
    h.send(ipc.Submit(request("good", max_tokens=30)))
    h.send(ipc.Submit(request("bad", "RAISE_VALUE")))
    messages = h.until_done("bad")
    error = next(m for m in messages if isinstance(m, ipc.Error))
    assert (error.request_id, error.status_code) == ("bad", 400)
    h.send(ipc.Submit(request("broken", "RAISE_RUNTIME")))  # raises inside a step: every member fails with 500
    messages = h.until_done("good", "broken")
    assert {m.request_id for m in messages if isinstance(m, ipc.Error) and m.status_code == 500} <= {"good", "broken"}
    assert any(isinstance(m, ipc.Error) and m.request_id == "broken" for m in messages)
    h.send(ipc.Submit(request("next", max_tokens=5)))  # a fresh batch serves the next request
    assert text_of(h.until_done("next"), "next") == render_reply(5)[0]
    h.shutdown()


# -- through HTTP ------------------------------------------------------------------------------------------
def batch_app(engine: FakeEngine, **settings):
    client = InProcessEngineClient(lambda: engine)
    return create_app(settings=ServerSettings(**settings), engine_client=client, tokenizer=FakeTokenizer(),
                      model_name="fake-model")


def stream_text(base_url: str, body: dict, out: dict, key: str, first_at: dict) -> None:
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        text = ""
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if delta and key not in first_at:
                    first_at[key] = time.monotonic()
                text += delta
    out[key] = (text, time.monotonic())


def test_http_four_concurrent_streams_each_exact_with_running_gauges_and_batch_size():
    engine = FakeEngine(max_num_seqs=4, delay_s=0.02, chars_per_event=1)
    app = batch_app(engine, max_queue=4)
    with UvicornThread(app) as server:
        server.wait_healthy()
        bodies = {f"r{i}": {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 40 + 10 * i,
                            "ignore_eos": True} for i in range(3)}
        out: dict = {}
        first_at: dict = {}
        threads = [threading.Thread(target=stream_text, args=(server.base_url, body, out, key, first_at))
                   for key, body in bodies.items()]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while app.state.admission.running < 3:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        health = httpx.get(f"{server.base_url}/health").json()
        assert health["running"] == 3 and health["queue_depth"] == 0
        with httpx.Client(base_url=server.base_url) as http:
            gauges = scrape_metrics(http)
        labels = '{engine="0",model_name="fake-model"}'
        assert gauges["subspec_requests_running"] == gauges["vllm:num_requests_running" + labels] == 3
        late = threading.Thread(target=stream_text, args=(server.base_url, {
            "messages": [{"role": "user", "content": "late"}], "max_tokens": 5}, out, "late", first_at))
        late.start()
        for thread in (*threads, late):
            thread.join(30)
        for key, body in bodies.items():
            assert out[key][0] == render_reply(body["max_tokens"], ignore_eos=True)[0]
        assert out["late"][0] == render_reply(5)[0]
        assert first_at["late"] < min(out[key][1] for key in bodies)  # its first token before any of them ended
        with httpx.Client(base_url=server.base_url) as http:
            metrics = scrape_metrics(http)
        assert metrics["subspec_batch_size_count"] == len(engine.batch_sizes)
        assert metrics["subspec_batch_size_sum"] / metrics["subspec_batch_size_count"] > 2
        assert metrics["subspec_forward_rows_sum"] == metrics["subspec_batch_size_sum"]  # the fake: a row each
        assert app.state.admission.running == 0


@pytest.mark.parametrize("max_num_seqs", [1, 3])
def test_the_api_runs_as_many_requests_at_once_as_the_ready_worker_reports(max_num_seqs):
    """The API process cannot plan (no torch): it starts with one slot and takes the worker's count from Ready (the
    loop's slots: the planner's choice under max_num_seqs auto), shown in /health."""
    engine = FakeEngine(max_num_seqs=max_num_seqs)
    assert engine_loop(engine, receive=lambda t: None, send=lambda m: None).slots == max_num_seqs
    app = batch_app(engine)
    assert app.state.admission.slots == 1
    with UvicornThread(app) as server:
        server.wait_healthy()
        assert app.state.admission.slots == max_num_seqs
        assert httpx.get(f"{server.base_url}/health").json()["max_num_seqs"] == max_num_seqs


def test_http_a_request_timeout_ends_one_request_and_the_other_finishes_exact():
    engine = FakeEngine(max_num_seqs=2, delay_s=0.02, chars_per_event=1)
    app = batch_app(engine, request_timeout_s=1.0)
    with UvicornThread(app) as server:
        server.wait_healthy()
        url = f"{server.base_url}/v1/chat/completions"
        results: dict = {}

        threads = [post_in_thread(url, long_chat(key, n), results, key, timeout=30)
                   for key, n in (("long", 200), ("short", 30))]  # 4 s against the 1 s deadline; 0.6 s
        for thread in threads:
            thread.join(30)
        assert results["long"].status_code == 504 and results["long"].json()["error"]["code"] == "request_timeout"
        assert results["short"].status_code == 200
        assert results["short"].json()["choices"][0]["message"]["content"] == render_reply(30, ignore_eos=True)[0]
        deadline = time.monotonic() + 5
        while app.state.admission.running or not engine.closed_early:  # the abort reaches the worker
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert max(engine.batch_sizes) == 2 and len(engine.closed_early) == 1
