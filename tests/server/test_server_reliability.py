"""Hostile and unlucky clients against the HTTP layer (fake engine, real uvicorn on loopback): invalid
Unicode, oversized and half-sent bodies, half-sent heads, a graceful drain, and an OpenAPI document that
says what the server does. The real-model counterparts are in test_server_real_*."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.worker.inprocess import InProcessEngineClient
from server.settings import ServerSettings
from tests.server.server_fakes import FakeEngine, FakeTokenizer, render_reply
from tests.server.server_harness import UvicornThread, scrape_metrics

KEY = "sk-fake"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSGS = [{"role": "user", "content": "Say hello"}]
LIMIT = 64 * 1024


def make_app(engine: FakeEngine, **settings: Any):
    return create_app(settings=ServerSettings(**settings), engine_client=InProcessEngineClient(lambda: engine),
                      tokenizer=FakeTokenizer(), model_name="fake-model")


@pytest.fixture(scope="module")
def served():
    """Served the way `subspec serve` serves (timed h11 protocol), with a key, a small body limit and
    short read timeouts."""
    settings = ServerSettings(api_key=KEY, max_body_bytes=LIMIT, read_timeout_s=0.6)
    with UvicornThread(make_app(FakeEngine(), **settings.__dict__), settings=settings) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http:
            yield server, http


def ok_after(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 5})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == render_reply(5)[0]


# -- invalid Unicode ---------------------------------------------------------------------------------------
LONE = "\\ud800"  # a JSON escape of a lone surrogate, written into the raw body


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi LONE"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "LONE"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi", "name": "LONE"}]}', "messages[0].name"),
    ("/v1/chat/completions", '{"model": "LONE", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\\udfffx"]}', "stop[1]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "user": "LONE"}', "user"),
    ("/v1/completions", '{"prompt": "aLONE"}', "prompt"),
    ("/v1/completions", '{"prompt": ["LONE"]}', "prompt[0]"),
])
def test_lone_surrogates_are_a_400_naming_the_field_counted_once(served, path, body, field):
    _, http = served
    label = f'subspec_requests_total{{endpoint="{path}",status="400"}}'
    before = scrape_metrics(http)
    response = http.post(path, content=body.replace("LONE", LONE), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "invalid_unicode" and field in error["message"]
    after = scrape_metrics(http)
    assert after[label] == before.get(label, 0) + 1
    assert sum(v for k, v in after.items() if k.startswith("subspec_requests_total") and 'status="5' in k) == 0
    ok_after(http)


# -- request bodies ----------------------------------------------------------------------------------------
def raw_request(port: int, head: bytes, body_chunks: list[bytes] = (), read_timeout: float = 5) -> tuple[bytes, float]:
    """Send a request head (and maybe some body) on a raw socket; return what the server answered and when."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(read_timeout)
        started = time.monotonic()
        sock.sendall(head)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server already answered and closed
        reply = b""
        try:
            while data := sock.recv(65536):
                reply += data
        except ConnectionResetError:
            pass
        return reply, time.monotonic() - started


def head(path: str, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def json_body(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def test_a_declared_oversized_body_is_a_413_before_any_of_it_is_read(served):
    server, http = served
    reply, elapsed = raw_request(server.port, head("/v1/chat/completions", "Content-Length: 10000000\r\n"))
    assert reply.startswith(b"HTTP/1.1 413 ") and b"connection: close" in reply.lower()
    error = json_body(reply)["error"]
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]
    assert elapsed < 2  # answered without waiting for the 10 MB that was never sent
    ok_after(http)


def test_a_chunked_body_is_cut_off_at_the_limit(served):
    server, http = served
    before = scrape_metrics(http).get('subspec_requests_total{endpoint="/v1/completions",status="413"}', 0)
    piece = b"x" * 16384
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 64  # 1 MiB offered, 64 KiB allowed
    reply, _ = raw_request(server.port, head("/v1/completions", "Transfer-Encoding: chunked\r\n"), chunks)
    assert reply.startswith(b"HTTP/1.1 413 ")
    after = scrape_metrics(http)['subspec_requests_total{endpoint="/v1/completions",status="413"}']
    assert after == before + 1
    ok_after(http)


def test_a_body_just_under_the_limit_is_read(served):
    _, http = served
    prompt = "a" * (LIMIT - 100)
    response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    assert response.status_code == 400 and "maximum context length" in response.json()["error"]["message"]


def test_half_sent_requests_are_dropped_after_the_read_timeout(served):
    """300 clients that send half a head, or a head and half a body, then wait: none is kept past the timeout."""
    server, http = served
    sockets = []
    for i in range(300):
        sock = socket.create_connection(("127.0.0.1", server.port))
        if i % 2:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        else:
            sock.sendall(head("/v1/completions", "Content-Length: 100\r\n") + b'{"prompt": "ab')
        sock.settimeout(5)
        sockets.append(sock)
    started = time.monotonic()
    replies = []
    for sock in sockets:
        reply = b""
        try:
            while data := sock.recv(65536):
                reply += data
        except ConnectionResetError:
            pass
        replies.append(reply)
        sock.close()
    assert time.monotonic() - started < 5
    assert all(reply == b"" for reply in replies[1::2])  # half a head: just closed
    assert all(reply.startswith(b"HTTP/1.1 408 ") for reply in replies[0::2])  # half a body: 408
    assert json_body(replies[0])["error"]["code"] == "request_timeout"
    ok_after(http)


# -- documentation -----------------------------------------------------------------------------------------
def test_docs_follow_the_key_and_probes_stay_open(served):
    server, http = served
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
        assert httpx.get(server.base_url + path).status_code == 401, path
        assert http.get(path).status_code == 200, path
    for path in ("/health", "/metrics"):
        assert httpx.get(server.base_url + path).status_code == 200, path
    schema = http.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"] == {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    assert schema["paths"]["/v1/completions"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_the_openapi_document_says_what_the_server_does():
    with UvicornThread(make_app(FakeEngine())) as server:
        schema = httpx.get(f"{server.base_url}/openapi.json").json()
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text  # validation errors are 400s
    paths = schema["paths"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert paths["/v1/models/{model}"]["get"]["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "408", "413", "429", "500", "503", "504"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "503" in paths["/health"]["get"]["responses"]
    assert "securitySchemes" not in schema["components"]  # no key, no security requirement
    # Constraints checked after parsing are declared too (each is a 400 otherwise).
    components = schema["components"]["schemas"]
    assert components["ContentPart"]["properties"]["type"]["enum"] == ["text"]
    prompt = components["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[0] == {"type": "string", "minLength": 1}
    assert prompt[2]["items"] == {"type": "integer", "minimum": 0, "maximum": len(FakeTokenizer()) - 1}
    assert prompt[1]["maxItems"] == 1 and prompt[3]["maxItems"] == 1  # one prompt per request
    max_tokens = components["ChatCompletionRequest"]["properties"]["max_completion_tokens"]["anyOf"]
    assert {"type": "integer", "minimum": 1} in max_tokens


# -- graceful shutdown -------------------------------------------------------------------------------------
def stream_in_thread(url: str, body: dict, results: dict, key: str) -> threading.Thread:
    def run() -> None:
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as response:
            results[key] = (response.status_code, [line[len("data: "):] for line in response.iter_lines() if line])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def post_in_thread(url: str, body: dict, results: dict, key: str) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.__setitem__(key, httpx.post(url, json=body, timeout=30)))
    thread.start()
    return thread


@pytest.mark.parametrize("running_tokens, ends_with", [(50, "finished"), (200, "shutdown error")])
def test_sigterm_drains(running_tokens, ends_with):
    """SIGTERM: new requests and /health get 503 at once, queued requests end at once with an error (streams:
    an error event, then [DONE]), the running one finishes, or is ended with an error event at the shutdown
    timeout, and then the server exits."""
    engine = FakeEngine(delay_s=0.02, chars_per_event=1)  # 50 tokens: 1 s, 200 tokens: 4 s
    settings = ServerSettings(max_queue=8, shutdown_timeout_s=2.5)
    app = make_app(engine, max_queue=8, shutdown_timeout_s=2.5)
    server = UvicornThread(app, settings=settings)
    with server:
        server.wait_healthy()
        url = f"{server.base_url}/v1/chat/completions"
        results: dict[str, Any] = {}
        threads = [stream_in_thread(url, {"messages": MSGS, "max_tokens": running_tokens, "ignore_eos": True},
                                    results, "running")]
        while not engine.served:
            time.sleep(0.005)
        for i in range(4):
            threads.append(stream_in_thread(url, {"messages": MSGS, "max_tokens": 5}, results, f"stream{i}"))
            threads.append(post_in_thread(url, {"messages": MSGS, "max_tokens": 5}, results, f"post{i}"))
        while app.state.admission.waiting < 8:
            time.sleep(0.005)
        server.server.handle_exit(signal.SIGTERM, None)
        while not app.state.shutdown.draining:
            time.sleep(0.005)
        health = httpx.get(f"{server.base_url}/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        late = httpx.post(url, json={"messages": MSGS, "max_tokens": 5})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert late.headers["Retry-After"]
        for thread in threads:
            thread.join(10)
        server.thread.join(10)
        assert not server.thread.is_alive()  # the server exited by itself
    for i in range(4):
        status, payloads = results[f"stream{i}"]
        assert status == 200 and payloads[-1] == "[DONE]"  # queued streams had their 200 already
        assert json.loads(payloads[-2])["error"]["code"] == "shutting_down"
        response = results[f"post{i}"]
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    status, payloads = results["running"]
    assert status == 200 and payloads[-1] == "[DONE]"
    last = json.loads(payloads[-2])
    if ends_with == "finished":
        assert last["choices"][0]["finish_reason"] == "length"
        text = "".join(json.loads(p)["choices"][0]["delta"].get("content", "") for p in payloads[:-1])
        assert text == render_reply(running_tokens, ignore_eos=True)[0]
    else:
        assert last["error"]["code"] == "shutting_down" and "--shutdown-timeout" in last["error"]["message"]
        assert engine.closed_early  # the engine request was aborted, not run to the end
