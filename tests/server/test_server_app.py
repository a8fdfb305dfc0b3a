"""The HTTP layer end to end against a fake engine (in-process client, real uvicorn on a loopback port):
schemas, SSE framing, errors, admission, deadlines, disconnects and metrics, in well under a second each."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.worker.inprocess import InProcessEngineClient
from server.settings import ServerSettings
from tests.server.server_fakes import FakeEngine, FakeTokenizer, render_reply
from tests.server.server_harness import REPO_ROOT, UvicornThread, post_in_thread, scrape_metrics, wait_for

KEY = "sk-fake"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSGS = [{"role": "user", "content": "Say hello"}]


def make_app(engine: FakeEngine, *, tokenizer: Any = None, factory: Any = None, **settings: Any):
    client = InProcessEngineClient(factory or (lambda: engine))
    return create_app(settings=ServerSettings(**settings), engine_client=client,
                      tokenizer=tokenizer or FakeTokenizer(), model_name="fake-model")


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine(delay_s=0.005)
    with UvicornThread(make_app(engine, api_key=KEY)) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http:
            yield http, engine


def sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of an SSE body, checking the framing on the way."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    frames = body.split("\n\n")[:-1]
    payloads = []
    for frame in frames:
        assert frame.startswith("data: ") and "\n" not in frame, frame
        payloads.append(frame[len("data: "):])
    return payloads


def stream(http: httpx.Client, path: str, body: dict) -> list[Any]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_events(response)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def assert_ok_after(http: httpx.Client) -> None:
    """Every error case is followed by a request that must succeed."""
    response = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 5})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == render_reply(5)[0]


# -- success paths ---------------------------------------------------------------------------------------
def test_chat_completion(fake):
    http, _ = fake
    response = http.post("/v1/chat/completions", json={"model": "fake-model", "messages": MSGS, "max_tokens": 20,
                                                       "temperature": 0, "user": "u1", "seed": 7})
    assert response.status_code == 200
    body = response.json()
    text, reason = render_reply(20)
    assert body["object"] == "chat.completion" and body["model"] == "fake-model" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": reason}]
    prompt_len = len("<user>Say hello\n<assistant>")
    # the fake engine: 7 events (3 tokens each, 2 in the last) = a prefill and 6 iterations of 4 drafted tokens
    speculative = {"iterations": 6, "drafted_tokens": 24, "accepted_tokens": 11, "mean_accept_length": 2.8333}
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 20, "total_tokens": prompt_len + 20,
                             "prompt_tokens_details": {"cached_tokens": 0}, "speculative": speculative}
    assert "X-SubSpec-Ignored-Fields" not in response.headers


def test_default_max_tokens_fills_the_context(fake):
    http, engine = fake
    body = http.post("/v1/chat/completions", json={"messages": MSGS}).json()
    assert body["choices"][0]["message"]["content"] == render_reply(1000)[0]  # the whole script, then EOS
    assert body["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_framing_role_finish_usage(fake):
    http, _ = fake
    chunks = stream(http, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 20,
                                                   "stream_options": {"include_usage": True}})
    first, *middle, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == first["id"] for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == render_reply(20)[0]
    assert len(middle) == 7  # one chunk per engine event (3 tokens each)


def test_streamed_text_equals_non_streamed_text(fake):
    http, _ = fake
    for body in ({"messages": MSGS, "max_tokens": 40, "stop": ["fake"]}, {"messages": MSGS}):
        whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        chunks = stream(http, "/v1/chat/completions", body)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    assert whole and "你好" in whole


def test_completions(fake):
    http, _ = fake
    body = http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 12, "stop": "世"}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "Hello! 你好，", "logprobs": None, "finish_reason": "stop"}]
    assert {k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
        "prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}
    ids = http.post("/v1/completions", json={"prompt": [79, 110], "max_tokens": 3}).json()
    assert ids["choices"][0]["text"] == "Hel" and ids["usage"]["prompt_tokens"] == 2
    assert http.post("/v1/completions", json={"prompt": "x"}).json()["usage"]["completion_tokens"] == 16


def test_completions_stream(fake):
    http, _ = fake
    chunks = stream(http, "/v1/completions", {"prompt": "Once", "max_tokens": 10})
    assert chunks[0]["choices"][0]["text"] == "Hel"  # no role chunk for text completions
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == render_reply(10)[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]


def test_models_and_health(fake):
    http, _ = fake
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake-model"]
    assert models["data"][0]["max_model_len"] == 256
    assert http.get("/v1/models/fake-model").json()["id"] == "fake-model"
    assert http.get("/v1/models/other").status_code == 404
    health = httpx.get(f"{http.base_url}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


# -- errors ------------------------------------------------------------------------------------------------
def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["request_id"] == response.headers["X-Request-Id"]  # the id a user can quote to find the logs
    return error


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}])
def test_401_without_the_right_key(fake, headers):
    http, _ = fake
    response = httpx.post(f"{http.base_url}/v1/chat/completions", json={"messages": MSGS}, headers=headers)
    assert error_of(response, 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{http.base_url}/v1/models", headers=headers).status_code == 401
    assert_ok_after(http)


@pytest.mark.parametrize("content, param_part, message_part", [
    (b"{not json", None, "not valid JSON"),
    (b"", None, "missing"),
    (b"[1, 2]", None, "JSON object"),
])
def test_400_for_bodies_that_are_not_objects(fake, content, param_part, message_part):
    http, _ = fake
    response = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert message_part in error_of(response, 400)["message"]
    assert_ok_after(http)


@pytest.mark.parametrize("body, param, message_part", [
    ({"messages": []}, "messages", "at least 1"),
    ({}, "messages", "Missing required parameter"),
    ({"messages": MSGS, "max_tokens": "ten"}, "max_tokens", "valid integer"),
    ({"messages": MSGS, "temperature": "hot"}, "temperature", "valid number"),
    ({"messages": MSGS, "max_tokens": -1}, "max_tokens", "at least 1"),
    ({"messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens", "at least 1"),
    ({"messages": MSGS, "max_completion_tokens": 4, "max_tokens": 0}, "max_tokens", "at least 1"),  # unused, still checked
    ({"messages": MSGS, "max_tokens": 10_000}, "max_tokens", "maximum context length"),
    ({"messages": [{"role": "user", "content": "x" * 300}]}, "messages", "maximum context length"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", "only 'text' parts"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "Input should be"),
    ({"messages": MSGS, "n": 2}, "n", "Unsupported parameter"),
    ({"messages": MSGS, "min_p": 0.1, "presence_penalty": 1}, "presence_penalty", "presence_penalty, min_p"),
    ({"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "needs a `schema`"),
    ({"messages": MSGS, "logit_bias": {"1": 2}}, "logit_bias", "logit_bias"),
    ({"messages": MSGS, "tools": [{"type": "function"}]}, "tools[0].function", "Missing required parameter"),
    ({"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "no tool support"),
    ({"messages": MSGS, "tool_choice": "required"}, "tool_choice", "requires tools"),
    ({"messages": MSGS, "top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    ({"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"messages": MSGS, "guided_json": {"type": "strin"}}, "guided_json", "Invalid type: strin"),
    ({"messages": MSGS, "guided_regex": "[a-", "response_format": {"type": "json_object"}}, "guided_regex",
     "only one structured output constraint"),
    ({"messages": MSGS, "stop": ["a", ""]}, "stop", "non-empty"),
    ({"messages": [{"role": "user", "content": "RAISE_VALUE"}]}, None, "rejects this prompt"),
])
def test_400s_name_the_problem(fake, body, param, message_part):
    http, _ = fake
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert message_part in error["message"]
    if param is not None:
        assert error["param"] == param
    assert_ok_after(http)


@pytest.mark.parametrize("body, message_part", [
    ({"prompt": ["a", "b"]}, "batched prompts"),
    ({"prompt": ""}, "empty"),
    ({"prompt": "x", "suffix": "y", "best_of": 2}, "suffix, best_of"),
    ({"prompt": "x", "max_tokens": 0}, "0 is allowed with echo"),
    ({"prompt": "x", "logprobs": 21}, "less than or equal to 20"),
    ({"prompt": 5}, "Invalid value"),
])
def test_completion_400s(fake, body, message_part):
    http, _ = fake
    assert message_part in error_of(http.post("/v1/completions", json=body), 400)["message"]
    assert_ok_after(http)


def test_404_unknown_model_and_route(fake):
    http, _ = fake
    error = error_of(http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": MSGS}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-4" in error["message"]
    error_of(http.get("/v1/nothing"), 404)
    assert_ok_after(http)


def test_engine_failure_is_a_500_for_that_request_only(fake):
    http, _ = fake
    response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "RAISE_RUNTIME"}]})
    assert error_of(response, 500)["type"] == "server_error"
    chunks = stream(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "RAISE_RUNTIME"}]})
    assert "fake engine broke" in chunks[-1]["error"]["message"]
    assert_ok_after(http)


def test_no_chat_template_is_a_clear_400():
    with UvicornThread(make_app(FakeEngine(), tokenizer=FakeTokenizer(chat_template=None))) as server:
        server.wait_healthy()
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": MSGS})
        assert error_of(response, 400)["code"] == "no_chat_template"
        assert httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x"}).status_code == 200


# -- readiness, admission, deadlines, disconnects ----------------------------------------------------------
def test_503_until_the_engine_is_ready():
    loaded = threading.Event()
    engine = FakeEngine()

    def slow_factory() -> FakeEngine:
        loaded.wait(30)
        return engine

    with UvicornThread(make_app(engine, factory=slow_factory)) as server:
        health = httpx.get(f"{server.base_url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": MSGS})
        assert error_of(response, 503)["code"] == "engine_not_ready"
        assert response.headers["Retry-After"]
        loaded.set()
        server.wait_healthy()
        assert httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": MSGS}).status_code == 200




def test_queue_full_is_a_429_and_admitted_requests_complete_in_order():
    gate = threading.Event()  # r0 holds the engine until the 429 has been seen, however slow the machine
    engine = FakeEngine(delay_s=0.02, chars_per_event=1, gate=gate)
    app = make_app(engine, max_queue=2)
    with UvicornThread(app) as server:
        server.wait_healthy()
        url = f"{server.base_url}/v1/chat/completions"
        results: dict = {}
        threads = [post_in_thread(url, {"messages": MSGS, "max_tokens": 15}, results, "r0")]
        wait_for(lambda: app.state.admission.running == 1)
        for i in (1, 2):
            threads.append(post_in_thread(url, {"messages": [{"role": "user", "content": f"m{i}"}],
                                                "max_tokens": 5}, results, f"r{i}"))
            wait_for(lambda n=i: app.state.admission.waiting == n)
        rejected = httpx.post(url, json={"messages": MSGS, "max_tokens": 5})
        assert error_of(rejected, 429)["code"] == "queue_full"
        assert rejected.headers["Retry-After"] == "1"
        assert httpx.get(f"{server.base_url}/health").json()["queue_depth"] == 2
        with httpx.Client(base_url=server.base_url) as http:
            gauges = scrape_metrics(http)
        labels = '{engine="0",model_name="fake-model"}'
        assert gauges["subspec_requests_running"] == gauges["vllm:num_requests_running" + labels] == 1
        assert gauges["subspec_queue_depth"] == gauges["vllm:num_requests_waiting" + labels] == 2
        gate.set()
        for thread in threads:
            thread.join(30)
        assert [results[k].status_code for k in ("r0", "r1", "r2")] == [200, 200, 200]
        assert results["r0"].json()["choices"][0]["message"]["content"] == render_reply(15)[0]
        served = [results[k].json()["id"] for k in ("r0", "r1", "r2")]
        assert engine.served == served  # FIFO
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert 'subspec_requests_total{endpoint="/v1/chat/completions",status="429"} 1.0' in metrics


def test_deadline_ends_long_requests_and_frees_the_engine():
    engine = FakeEngine(delay_s=0.02, chars_per_event=1)
    with UvicornThread(make_app(engine, request_timeout_s=0.4)) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            long_body = {"messages": MSGS, "max_tokens": 200, "ignore_eos": True}
            started = time.monotonic()
            error = error_of(http.post("/v1/chat/completions", json=long_body), 504)
            assert time.monotonic() - started < 2
            assert error["code"] == "request_timeout" and "0.4 s" in error["message"]
            chunks = stream(http, "/v1/chat/completions", long_body)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert chunks[-1]["error"]["code"] == "request_timeout"
            assert_ok_after(http)
            wait_for(lambda: len(engine.closed_early) == 2)
            metrics = http.get("/metrics").text
            assert 'subspec_requests_total{endpoint="/v1/chat/completions",status="504"} 2.0' in metrics


def test_client_disconnect_aborts_and_the_next_request_starts_at_once():
    engine = FakeEngine(delay_s=0.02, chars_per_event=1)
    app = make_app(engine)
    with UvicornThread(app) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            body = {"messages": MSGS, "max_tokens": 200, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
            wait_for(lambda: len(engine.closed_early) == 1, timeout=2)  # aborted, not run to 250 tokens
            assert app.state.admission.running == 0
            started = time.monotonic()
            assert_ok_after(http)
            assert time.monotonic() - started < 1.5
            # A non-streamed request whose client gives up is aborted too.
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
            wait_for(lambda: len(engine.closed_early) == 2, timeout=2)
            metrics = http.get("/metrics").text
            assert 'subspec_requests_total{endpoint="/v1/chat/completions",status="499"} 2.0' in metrics


def test_metrics_move_after_a_request(fake):
    http, _ = fake

    before = scrape_metrics(http)
    assert http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 12}).status_code == 200
    after = scrape_metrics(http)
    ok = 'subspec_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert after[ok] == before.get(ok, 0) + 1
    for name in ("subspec_generation_tokens_total", "subspec_prompt_tokens_total", "subspec_drafted_tokens_total",
                 "subspec_accepted_tokens_total", "subspec_draft_seconds_total", "subspec_verify_seconds_total",
                 "subspec_h2d_bytes_total", "subspec_time_to_first_token_seconds_count",
                 "subspec_inter_token_latency_seconds_count", "subspec_e2e_request_latency_seconds_count",
                 "subspec_accept_length_count", "subspec_request_generation_throughput_tokens_per_second_count"):
        assert after[name] > before.get(name, 0), name
    assert after["subspec_generation_tokens_total"] - before.get("subspec_generation_tokens_total", 0) == 12
    assert after["subspec_generation_throughput_tokens_per_second"] > 0
    assert after["subspec_queue_depth"] == 0 and after["subspec_requests_running"] == 0
    assert after["subspec_worker_ready"] == 1
    # Other endpoints are counted by status too (the scrape above is one of them; 401s included).
    assert after['subspec_requests_total{endpoint="/metrics",status="200"}'] >= 1
    unauthorized = 'subspec_requests_total{endpoint="/v1/models",status="401"}'
    httpx.get(f"{http.base_url}/v1/models")
    assert scrape_metrics(http)[unauthorized] == after.get(unauthorized, 0) + 1


def test_openapi_docs_describe_the_api():
    with UvicornThread(make_app(FakeEngine())) as server:
        schema = httpx.get(f"{server.base_url}/openapi.json").json()
        assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
        fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
        assert fields["max_completion_tokens"]["description"]
        assert httpx.get(f"{server.base_url}/docs").status_code == 200


def test_api_modules_do_not_import_the_engine_or_torch():
    """Only the worker process may import the engine (and with it torch and CUDA)."""
    import subprocess
    import sys

    code = ("import sys, server.cli, server.app, server.worker.process, server.worker.inprocess, server.worker; "
            "bad = [m for m in ('torch', 'subspec_core.engine') if m in sys.modules]; print(bad); "
            "raise SystemExit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
