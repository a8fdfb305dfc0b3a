"""Broken and hostile clients against the HTTP layer served as `subspec serve` serves it (timed h11 protocol,
fake engine, real uvicorn on loopback): a reader that stops reading, one slower than the engine, deep JSON,
huge and many field names, 413s every client can read, Content-Length with Transfer-Encoding, secrets in
query strings, and a burst of large prompts."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import httpx
import openai
import pytest

from server.app import create_app
from server.settings import ServerSettings
from server.worker.inprocess import InProcessEngineClient
from tests.server.server_fakes import FakeEngine, FakeTokenizer, render_reply
from tests.server.server_harness import UvicornThread, scrape_metrics, wait_for

MSGS = [{"role": "user", "content": "Say hello"}]
CHAT = "/v1/chat/completions"


def serve(engine: FakeEngine, tokenizer: Any = None, **settings: Any) -> UvicornThread:
    settings_ = ServerSettings(**settings)
    app = create_app(settings=settings_, engine_client=InProcessEngineClient(lambda: engine),
                     tokenizer=tokenizer or FakeTokenizer(), model_name="fake-model")
    return UvicornThread(app, settings=settings_)


def status_count(http: httpx.Client, status: int) -> float:
    return scrape_metrics(http).get(f'subspec_requests_total{{endpoint="{CHAT}",status="{status}"}}', 0)


def silent_stream(port: int, body: dict) -> socket.socket:
    """A client that sends a streamed request and then reads nothing, with a tiny receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    received = b""
    try:
        while data := sock.recv(1 << 20):
            received += data
    except (ConnectionResetError, socket.timeout):
        pass
    return received


# Each token carries 20 alternatives: ~1 kB of SSE per token, so a few thousand tokens pass what the kernel's
# socket buffers (a few MB on loopback) absorb for a client that does not read.
LOUD = {"messages": MSGS, "logprobs": True, "top_logprobs": 20, "ignore_eos": True}
LOAD_TOKENS = {"max_tokens": 12_000}  # ~12 MB of SSE


def test_a_reader_that_stops_reading_frees_the_engine_at_once_and_is_cut_off_after_the_write_timeout():
    engine = FakeEngine(chars_per_event=500, max_model_len=100_000)
    with serve(engine, write_timeout_s=1.0, max_stream_buffer_bytes=64 << 20) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            before = status_count(http, 499)
            stalled = silent_stream(server.port, {**LOAD_TOKENS, **LOUD})
            wait_for(lambda: engine.finished, 20, "the stalled request's generation")
            # the engine is done with it: another request runs now, not after the stalled client's reply
            started = time.monotonic()
            response = http.post(CHAT, json={"messages": MSGS, "max_tokens": 4})
            assert response.status_code == 200 and time.monotonic() - started < 2, response.text
            assert http.get("/health").json()["status"] == "ok"
            cut = wait_for(lambda: status_count(http, 499) == before + 1, 10, "the stalled stream's 499")
            assert read_all(stalled, timeout=5).startswith(b"HTTP/1.1 200")  # what the kernel buffered, then EOF
            stalled.close()
    print(f"\nstalled reader counted 499 {cut:.1f} s after the other request")


def test_a_reader_slower_than_the_engine_is_stopped_when_its_buffer_fills_and_told_why():
    engine = FakeEngine(chars_per_event=100, delay_s=0.01, max_model_len=1_000_000)
    with serve(engine, write_timeout_s=20.0, max_stream_buffer_bytes=64 << 10) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            before = status_count(http, 499)
            slow = silent_stream(server.port, {**LOUD, "max_tokens": 900_000})
            wait_for(lambda: engine.closed_early, 30, "the abort of the slow client's request")
            response = http.post(CHAT, json={"messages": MSGS, "max_tokens": 4})
            assert response.status_code == 200, response.text
            received = read_all(slow)  # the client finally reads: what was buffered, then why it ended
            slow.close()
            body = received.split(b"\r\n\r\n", 1)[1]  # chunked: the last frames, then the closing chunk
            assert b'"code":"client_too_slow"' in body and body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
            wait_for(lambda: status_count(http, 499) == before + 1, 5, "the slow stream's 499")


def test_the_request_timeout_bounds_sending_too(monkeypatch):
    monkeypatch.setattr("server.api.sse._LAST_FRAMES_S", 0.5)
    engine = FakeEngine(chars_per_event=500, max_model_len=100_000)
    with serve(engine, write_timeout_s=60.0, request_timeout_s=1.0, max_stream_buffer_bytes=64 << 20) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            before = status_count(http, 504)
            stalled = silent_stream(server.port, {**LOAD_TOKENS, **LOUD})
            wait_for(lambda: engine.finished, 20, "the stalled request's generation")  # within its deadline
            cut = wait_for(lambda: status_count(http, 504) == before + 1, 10, "the 504 of a reply sent too slowly")
            stalled.close()
    assert cut < 5


# -- input shape --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http():
    with serve(FakeEngine(), max_body_bytes=1 << 20) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            yield client


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/v1/responses"])
@pytest.mark.parametrize("depth", [65, 480, 100_000])
def test_deep_json_is_a_400_naming_the_limit_with_one_short_log_line(http, caplog, path, depth):
    body = f'{{"messages": [], "prompt": "x", "input": "x", "x_extra": {nested(depth)}}}'
    with caplog.at_level(logging.INFO):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "json_too_deep" and "64 levels" in error["message"] and error["param"] is None
    logged = [r for r in caplog.records if r.name.startswith(("server", "uvicorn"))]
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in logged)
    assert sum(len(r.getMessage()) for r in logged) < 400, [r.getMessage() for r in logged]


@pytest.mark.parametrize("body", [b"null", b"1", b'"x"', b"[]", b"[1, null]"])
def test_json_that_is_not_an_object_is_a_400_not_a_500(http, body):
    response = http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"], response.text


def test_64_levels_are_still_accepted(http):
    body = {"messages": MSGS, "max_tokens": 2, "x_extra": json.loads(nested(62))}  # 64 with the top object
    assert http.post(CHAT, json=body).status_code == 200


def test_huge_and_many_field_names_are_refused_and_long_unknown_names_are_cut(http, caplog):
    huge = http.post(CHAT, json={"messages": MSGS, "k" * 300_000: 1})
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "field_name_too_long"
    many = http.post(CHAT, json={"messages": MSGS, "x_extra": {f"f{i}": i for i in range(2000)}})
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_fields"
    with caplog.at_level(logging.WARNING):
        long = http.post(CHAT, json={"messages": MSGS, "max_tokens": 2, "n" * 250: 1})
    assert long.status_code == 200
    header = long.headers["X-SubSpec-Ignored-Fields"]
    assert len(header) == 64 and header.endswith("...")
    assert all(len(r.getMessage()) < 200 for r in caplog.records)
    names = {f"x{i:03d}" + "y" * 200: 1 for i in range(40)}
    many_long = http.post(CHAT, json={"messages": MSGS, "max_tokens": 2, **names})
    assert len(many_long.headers["X-SubSpec-Ignored-Fields"]) <= 1024


def test_metadata_is_limited_as_openai_limits_it(http):
    for metadata in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        for path, body in ((CHAT, {"messages": MSGS}), ("/v1/responses", {"input": "hi"})):
            response = http.post(path, json={**body, "max_tokens": 2, "metadata": metadata})
            assert response.status_code == 400 and response.json()["error"]["param"] == "metadata", response.text
    ok = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, "metadata": {"k": "v"}})
    assert ok.status_code == 200 and ok.json()["metadata"] == {"k": "v"}


def test_invalid_json_names_no_parameter_and_every_400_has_a_code(http):
    invalid = http.post(CHAT, content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] is None
    bodies = [{"messages": "x"}, {"messages": MSGS, "max_tokens": 0}, {"messages": MSGS, "n": 2},
              {"messages": MSGS, "tool_choice": "required"}, {"messages": MSGS, "top_logprobs": 2}]
    for response in [invalid, *(http.post(CHAT, json=body) for body in bodies),
                     http.post("/v1/completions", json={"prompt": ["a", "b"]}),
                     http.post("/v1/responses", json={"input": "hi", "previous_response_id": "r"})]:
        assert response.status_code == 400 and response.json()["error"]["code"], response.text
    assert http.get("/nowhere").json()["error"]["code"] == "not_found"


def test_query_strings_never_reach_the_log(http, caplog):
    with caplog.at_level(logging.INFO):
        http.get("/v1/models?api_key=sk-SECRET-123")
        http.post(f"{CHAT}?api_key=sk-SECRET-123", json={"messages": MSGS, "max_tokens": 2})
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(("server", "uvicorn"))]  # not httpx's
    assert not any("SECRET" in line for line in lines)
    assert any(line.endswith(tuple("0123456789]")) and '"GET /v1/models"' in line for line in lines), lines


# -- 413s every client can read -----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [int(1.5 * (1 << 20)), 10 * (1 << 20)])
def test_a_413_reaches_every_kind_of_client(http, size, tmp_path):
    content = "x" * size
    body = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
    # httpx
    response = http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    # the OpenAI SDK (httpx underneath, retries off: the first answer must be the 413)

    async def sdk() -> None:
        client = openai.AsyncOpenAI(base_url=f"{http.base_url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": content}])
        assert info.value.status_code == 413
        await client.close()

    asyncio.run(sdk())
    # urllib (http.client)
    request = urllib.request.Request(f"{http.base_url}{CHAT}", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 413 and b"request_too_large" in error.value.read()
    # curl, with and without `Expect: 100-continue` (which curl sends for large bodies)
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    path = tmp_path / "body.json"
    path.write_bytes(body)
    for expect in ([], ["-H", "Expect:"]):
        result = subprocess.run([curl, "-sS", "-o", "-", "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
                                 *expect, "--data-binary", f"@{path}", f"{http.base_url}{CHAT}"],
                                capture_output=True, timeout=60)
        assert result.stdout.endswith(b"\n413") and b"request_too_large" in result.stdout, result


# -- framing ------------------------------------------------------------------------------------------------
def test_content_length_with_transfer_encoding_is_a_400_and_nothing_after_it_is_answered(http):
    port = int(http.base_url.port)
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)
        reply = read_all(sock, timeout=5)
    assert reply.startswith(b"HTTP/1.1 400 ") and b"connection: close" in reply.lower()
    assert b'"code":"ambiguous_framing"' in reply and reply.count(b"HTTP/1.1 ") == 1


# -- load ---------------------------------------------------------------------------------------------------
class SlowTokenizer(FakeTokenizer):
    """Tokenizes at ~2 MB/s without holding the GIL, like the Rust tokenizers do; lists a one-character
    vocabulary, so a prompt's character count bounds its tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded.append(len(text))
        time.sleep(len(text) / 2e6)
        return super().encode(text, add_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return {"a": 97, "b": 98}


def test_large_prompts_in_flight_do_not_delay_a_small_one_and_over_long_text_is_not_tokenized():
    tokenizer = SlowTokenizer()
    engine = FakeEngine(max_model_len=1_000_000)
    with serve(engine, tokenizer=tokenizer, max_body_bytes=4 << 20) as server:
        server.wait_healthy()
        big = {"messages": [{"role": "user", "content": "x" * 900_000}], "max_tokens": 1}
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(f"{server.base_url}{CHAT}", json=big, timeout=60).status_code)) for _ in range(8)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(tokenizer.encoded) >= 2, 10, "large prompts being tokenized")
        started = time.monotonic()
        small = httpx.post(f"{server.base_url}{CHAT}", json={"messages": MSGS, "max_tokens": 2}, timeout=60)
        small_s = time.monotonic() - started
        for thread in threads:
            thread.join(60)
        assert small.status_code == 200 and small.json()["choices"][0]["message"]["content"] == render_reply(2)[0]
        assert results == [200] * 8
        assert small_s < 0.5, f"the small request took {small_s:.2f} s behind 8 large ones (~0.45 s each)"
    short_engine = FakeEngine(max_model_len=1000)
    tokenizer = SlowTokenizer()
    with serve(short_engine, tokenizer=tokenizer, max_body_bytes=4 << 20) as server:
        server.wait_healthy()
        response = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x" * 5000}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        assert tokenizer.encoded == []  # refused by its length alone
