"""POST /v1/responses against a fake engine (in-process client, real uvicorn): the response object, the
Responses event sequence with its sequence numbers, statelessness and errors. The official SDK against the
real model is in test_server_real_openai.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.server.server_fakes import FakeEngine, render_reply
from tests.server.server_harness import UvicornThread
from tests.server.test_server_app import error_of, make_app

OPENING = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def http():
    with UvicornThread(make_app(FakeEngine(delay_s=0.002))) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            yield client


def named_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The events of a Responses stream, checking `event: TYPE` matches each payload's type."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    body = response.read().decode()
    events = []
    for frame in body.split("\n\n")[:-1]:
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), frame
        payload = json.loads(data_line[len("data: "):])
        assert payload["type"] == name_line[len("event: "):]
        events.append(payload)
    assert "[DONE]" not in body  # OpenAI ends this API's streams with the terminal event, no sentinel
    return events


def stream(http: httpx.Client, body: dict) -> list[dict[str, Any]]:
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
        return named_events(response)


def test_response_object_with_instructions_as_the_system_message(http):
    body = http.post("/v1/responses", json={"model": "fake-model", "input": "Say hello", "instructions": "Be brief",
                                            "max_output_tokens": 100, "temperature": 0, "store": False}).json()
    text, _ = render_reply(100)
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["model"] == "fake-model"
    assert body["status"] == "completed" and body["incomplete_details"] is None and body["error"] is None
    assert isinstance(body["created_at"], int) and body["store"] is False and body["temperature"] == 0
    [message] = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["id"].startswith("msg_")
    assert message["content"] == [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    prompt = len("<system>Be brief\n<user>Say hello\n<assistant>")  # the fake template: one token per character
    assert body["usage"] == {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens": len(text), "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": prompt + len(text)}


def test_message_list_input_and_a_max_output_tokens_cut_is_incomplete(http):
    conversation = [{"role": "developer", "content": "Be kind"},
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                    {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                     "content": [{"type": "output_text", "text": "Hello", "annotations": []}]},
                    {"role": "user", "content": "Again"}]
    body = http.post("/v1/responses", json={"input": conversation, "max_output_tokens": 7}).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["output"][0]["content"][0]["text"] == render_reply(7)[0]
    rendered = "<system>Be kind\n<user>Hi\n<assistant>Hello\n<user>Again\n<assistant>"
    assert body["usage"]["input_tokens"] == len(rendered)


def test_stream_event_sequence_as_openai_sends_it(http):
    events = stream(http, {"input": "Say hello", "max_output_tokens": 20})
    types = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert types == OPENING + ["response.output_text.delta"] * len(deltas) + CLOSING + ["response.incomplete"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    created, in_progress, item_added, part_added = events[:4]
    response_id = created["response"]["id"]
    assert created["response"]["status"] == in_progress["response"]["status"] == "in_progress"
    assert created["response"]["output"] == [] and created["response"]["usage"] is None
    item_id = item_added["item"]["id"]
    assert item_added["item"] == {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant",
                                  "content": []}
    assert part_added["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    text = render_reply(20)[0]
    assert len(deltas) == 7 and "".join(d["delta"] for d in deltas) == text  # one delta per engine step
    for e in deltas + events[-4:-1]:
        if "item_id" in e:
            assert (e["item_id"], e["output_index"], e["content_index"]) == (item_id, 0, 0)
    text_done, part_done, item_done, final = events[-4:]
    assert text_done["text"] == part_done["part"]["text"] == item_done["item"]["content"][0]["text"] == text
    assert final["response"]["id"] == response_id and final["response"]["usage"]["output_tokens"] == 20
    whole = http.post("/v1/responses", json={"input": "Say hello", "max_output_tokens": 20}).json()
    assert whole["output"][0]["content"][0]["text"] == text


def test_stream_that_finishes_ends_with_response_completed(http):
    events = stream(http, {"input": "Say hello"})
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["status"] == "completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == render_reply(1000)[0]


def test_a_failure_mid_stream_is_an_error_event_then_response_failed(http):
    events = stream(http, {"input": "RAISE_RUNTIME please"})
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    error, failed = events[-2:]
    assert "the fake engine broke" in error["message"] and error["sequence_number"] == len(events) - 2
    assert failed["response"]["status"] == "failed" and "fake engine broke" in failed["response"]["error"]["message"]


@pytest.mark.parametrize("body, param, message_part", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "stateless"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools", "tools"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format.schema", "needs a `schema`"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format", "text.format (xml)"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include", "logprobs"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input[0]",
     "input items of type 'function_call_output' are not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content[0].type", "only text parts"),
    ({}, "input", "Missing required parameter"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "at least 1"),
    ({"input": "x" * 300}, "input", "maximum context length"),
])
def test_400s_name_the_problem(http, body, param, message_part):
    error = error_of(http.post("/v1/responses", json=body), 400)
    assert error["param"] == param and message_part in error["message"], error


def test_unknown_fields_are_ignored_and_named_in_a_header(http):
    response = http.post("/v1/responses", json={"input": "x", "max_output_tokens": 2, "frobnicate": 1})
    assert response.status_code == 200, response.text
    assert response.headers["X-SubSpec-Ignored-Fields"] == "frobnicate"


def test_unknown_model_is_a_404_and_accepted_defaults_pass(http):
    assert error_of(http.post("/v1/responses", json={"input": "x", "model": "gpt-5"}), 404)["code"] == "model_not_found"
    body = http.post("/v1/responses", json={
        "input": "x", "max_output_tokens": 3, "store": True, "tools": [], "tool_choice": "auto", "truncation": "auto",
        "include": ["reasoning.encrypted_content"], "reasoning": {"effort": None}, "text": {"format": {"type": "text"}},
        "metadata": {"k": "v"}, "parallel_tool_calls": False, "user": "u", "top_p": 0.9}).json()
    assert body["status"] == "incomplete" and body["store"] is False and body["metadata"] == {"k": "v"}
    assert body["top_p"] == 0.9
