"""`subspec serve` as a newcomer runs it: the default preset (mode auto, resident on a CPU) through the real
worker process. The start-up explains itself (mode and why, one timed line per phase, device-true memory
table, the URL to call), the official SDK's Responses calls work, and X-Request-Id reaches the worker's
log. The offload preset's start-up (subspec, every layer streamed) is read from the shared real server."""

from __future__ import annotations

import re
import time
from typing import Iterator

import httpx
import openai
import pytest

from server.engine_args import DEFAULT_PRESET
from server.serve import callable_url, ready_message
from subspec_core.config import load_yaml
from tests.server.server_harness import ServeProcess

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory, default_model_path) -> Iterator[ServeProcess]:
    """configs/default.yaml exactly as `subspec serve` without --config uses it (only the port differs)."""
    process = ServeProcess(tmp_path_factory.mktemp("auto"), "auto", load_yaml(DEFAULT_PRESET))
    process.start()
    try:
        yield process
    finally:
        process.stop()


def wait_for_line(process: ServeProcess, pattern: str, timeout: float = 10) -> str:
    """The server's log once `pattern` appears in it (lines from the worker arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log := process.log()):
        assert time.monotonic() < deadline, f"{pattern!r} not in the log:\n{log[-3000:]}"
        time.sleep(0.1)
    return log


def test_default_start_chooses_resident_and_explains_itself(default_server):
    log = wait_for_line(default_server, r"SubSpec Server ready in \d+\.\d s")
    assert "start-up: mode resident (chosen by mode auto): on a CPU" in log
    for phase in ("fetch", "tokenizer", "convert", "load", "place", "quantize", "warm up"):
        assert re.search(rf"start-up: {phase} +\d+\.\d\d s", log), phase
    assert re.search(r"start-up: warm up +\d+\.\d\d s  1 prefill \+ 1 decode step", log)
    assert "device total                       cpu" in log and not re.search(r"budget \d", log)
    assert f"at {default_server.base_url}/v1" in log and f"curl {default_server.base_url}/v1/chat/completions" in log
    assert "kernels" not in log


def test_offload_preset_start_runs_subspec_and_times_the_quantization(real_server):
    log = wait_for_line(real_server, r"SubSpec Server ready in")
    assert "start-up: mode subspec (as configured)" in log
    assert re.search(r"start-up: quantize +\d+\.\d\d s  int4 substitutes of 30 streamed layers", log)
    assert "streamed decoder layers            host" in log and "kernels" not in log


def test_sdk_responses_create_streaming_and_not(default_server):
    client = openai.OpenAI(base_url=f"{default_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    response = client.responses.create(model=model, input=QUESTION, instructions="Answer in one sentence.",
                                       max_output_tokens=16, temperature=0, store=False)
    assert response.id.startswith("resp_") and response.status in ("completed", "incomplete")
    assert "Paris" in response.output_text and response.usage.output_tokens <= 16
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    events = list(client.responses.create(model=model, input=[{"role": "system", "content": "Answer in one sentence."},
                                                              {"role": "user", "content": QUESTION}],
                                          max_output_tokens=16, temperature=0, stream=True))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == final.response.output_text == response.output_text  # greedy: the same text both ways
    with pytest.raises(openai.BadRequestError, match="stateless"):
        client.responses.create(model=model, input=QUESTION, previous_response_id=response.id)


def test_request_id_reaches_the_worker_log(default_server):
    response = httpx.post(f"{default_server.base_url}/v1/chat/completions", headers={"X-Request-Id": "newcomer-1"},
                          json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}, timeout=120)
    assert response.status_code == 200 and response.headers["X-Request-Id"] == "newcomer-1"
    wait_for_line(default_server, rf"\[worker\] server\.worker\.loop: request {response.json()['id']} finished .*"
                                  r"\[X-Request-Id newcomer-1\]")


def test_ready_message_names_a_url_a_client_can_call():
    assert callable_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert callable_url("::", 80) == "http://[::1]:80" and callable_url("example.org", 1) == "http://example.org:1"
    message = ready_message("0.0.0.0", 8000, "SmolLM2", 3.2, api_key=True)
    assert message.startswith("SubSpec Server ready in 3.2 s: SmolLM2 at http://127.0.0.1:8000/v1")
    assert "curl http://127.0.0.1:8000/v1/chat/completions" in message and "Bearer $YOUR_KEY" in message
    assert "Bearer" not in ready_message("127.0.0.1", 1, "m", 0, api_key=False)


def test_the_api_process_never_loads_torch(default_server):
    """The API process serves with the model's tokenizer but never imports torch (so it can never touch
    CUDA): no torch library is mapped into it; only the worker process has one."""
    with open(f"/proc/{default_server.process.pid}/maps") as maps:
        mapped = maps.read()
    assert "libtorch" not in mapped and "torch/_C" not in mapped
    worker = httpx.get(f"{default_server.base_url}/health").json()["worker_pid"]
    with open(f"/proc/{worker}/maps") as maps:
        assert "libtorch" in maps.read()  # the check can see torch where it is
