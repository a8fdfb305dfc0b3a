"""What real clients send beyond the basics, through the HTTP layer against a fake engine (fast): unknown
fields (ignored, logged once, named in a header), continuous usage stats, per-request speculation stats,
logprobs in OpenAI's chat and legacy shapes, echo, tool calls (whole and streamed), chat_template_kwargs, and
the vLLM-named spec-decode metrics."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from server.app import create_app
from server.worker.inprocess import InProcessEngineClient
from server.settings import ServerSettings
from tests.server.server_fakes import HERMES_FAKE_TEMPLATE, FakeEngine, FakeTokenizer, fake_logprob, render_reply
from tests.server.server_harness import UvicornThread, scrape_metrics
from tests.server.test_server_app import stream

MSGS = [{"role": "user", "content": "Say hello"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def serve(engine: FakeEngine, tokenizer: FakeTokenizer, **settings):
    client = InProcessEngineClient(lambda: engine)
    app = create_app(settings=ServerSettings(**settings), engine_client=client, tokenizer=tokenizer,
                     model_name="fake-model")
    return UvicornThread(app)


@pytest.fixture(scope="module")
def http():
    with serve(FakeEngine(), FakeTokenizer()) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            yield client


@pytest.fixture(scope="module")
def tools_server():
    """A fake model whose template supports tools (Hermes format) and whose reply is a tool call."""
    tokenizer = FakeTokenizer(chat_template=HERMES_FAKE_TEMPLATE)
    engine = FakeEngine(script="Let me check." + CALL, chars_per_event=7, max_model_len=1024)
    with serve(engine, tokenizer) as server:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            yield client, tokenizer, engine


# -- tolerant parsing ----------------------------------------------------------------------------------------
def test_unknown_fields_are_ignored_logged_once_and_named_in_a_header(http, caplog):
    body = {"messages": [{"role": "user", "content": "hi", "x_note": 1}], "max_tokens": 5, "frobnicate": True,
            "modalities": [], "web_search_options": {}, "logprobs": False, "n": 1}
    with caplog.at_level(logging.WARNING, logger="server.api.input_limits"):
        first = http.post("/v1/chat/completions", json=body)
        second = http.post("/v1/chat/completions", json=body)
        streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
    for response in (first, second, streamed):
        assert response.status_code == 200, response.text
        assert response.headers["X-SubSpec-Ignored-Fields"] == "frobnicate, messages[].x_note"
    assert first.json()["choices"][0]["message"]["content"] == render_reply(5)[0]
    logged = [r.getMessage() for r in caplog.records if "ignoring unknown request field" in r.getMessage()]
    assert len(logged) == 2 and "'frobnicate'" in logged[0] and "'messages[].x_note'" in logged[1]
    bad = http.post("/v1/chat/completions", json={"messages": MSGS, "n": 2, "zzz": 1})
    assert bad.status_code == 400 and bad.headers["X-SubSpec-Ignored-Fields"] == "zzz"
    assert bad.json()["error"]["param"] == "n"


def test_hostile_field_names_cannot_break_the_header(http):
    body = {"messages": MSGS, "max_tokens": 2, "字段": 1, "a\r\nSet-Cookie: x=1": 2,
            **{f"f{i}": i for i in range(40)}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and "set-cookie" not in response.headers
    header = response.headers["X-SubSpec-Ignored-Fields"]
    assert header.startswith("\\u5b57\\u6bb5, a\\r\\nSet-Cookie: x=1, f0, f1") and header.endswith("(10 more)")


def test_continuous_usage_stats_put_usage_on_every_chunk(http):
    chunks = stream(http, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 8, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == [0, 3, 6, 8, 8, 8]  # role chunk, 3 text chunks, finish chunk, final usage chunk
    assert all(c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + n for c, n in zip(chunks, counts))
    assert "speculative" in chunks[-1]["usage"] and "speculative" not in chunks[-2]["usage"]
    assert chunks[-1]["usage"]["speculative"] == {"iterations": 2, "drafted_tokens": 8, "accepted_tokens": 3,
                                                  "mean_accept_length": 2.5}
    # without include_usage: usage on every chunk still, but no final usage-only chunk
    chunks = stream(http, "/v1/completions", {"prompt": "x", "max_tokens": 4,
                                              "stream_options": {"continuous_usage_stats": True}})
    assert [c["usage"]["completion_tokens"] for c in chunks] == [3, 4, 4] and chunks[-1]["choices"]


# -- logprobs ------------------------------------------------------------------------------------------------
def chat_entry(token: str, position: int, top: int) -> dict:
    lp = fake_logprob(ord(token), position, top)

    def item(token_id: int, value: float) -> dict:
        return {"token": chr(token_id), "logprob": value, "bytes": list(chr(token_id).encode())}

    return {**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}


def test_chat_logprobs_whole_and_streamed(http):
    body = {"messages": MSGS, "max_tokens": 10, "logprobs": True, "top_logprobs": 2}
    prompt_len = len("<user>Say hello\n<assistant>")
    text = render_reply(10)[0]
    expected = [chat_entry(ch, prompt_len + i, 2) for i, ch in enumerate(text)]
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["logprobs"] == {"content": expected, "refusal": None}
    assert "你" in text and whole["logprobs"]["content"][7]["bytes"] == list("你".encode())
    chunks = stream(http, "/v1/chat/completions", body)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == expected
    plain = http.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": 0}).json()
    assert plain["choices"][0]["logprobs"] is None
    no_top = http.post("/v1/chat/completions", json={**body, "top_logprobs": None}).json()["choices"][0]
    assert all(entry["top_logprobs"] == [] for entry in no_top["logprobs"]["content"])


def test_completion_logprobs_and_echo(http):
    prompt = "Hi!"
    text = render_reply(4)[0]
    whole = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "logprobs": 1}).json()["choices"][0]
    values = [fake_logprob(ord(ch), len(prompt) + i, 1).logprob for i, ch in enumerate(text)]
    assert whole["logprobs"] == {
        "tokens": list(text), "token_logprobs": values,
        "top_logprobs": [{ch: v} for ch, v in zip(text, values)],  # the chosen token is the fake's top-1
        "text_offset": list(range(len(text)))}
    # echo + logprobs + max_tokens 1: lm-eval's loglikelihood request (ids as the prompt)
    echo = http.post("/v1/completions", json={"prompt": [[72, 105, 33]], "max_tokens": 1, "logprobs": 2,
                                              "echo": True, "temperature": 0}).json()["choices"][0]
    assert echo["text"] == "Hi!" + text[0]
    logprobs = echo["logprobs"]
    assert logprobs["tokens"] == ["H", "i", "!", text[0]] and logprobs["text_offset"] == [0, 1, 2, 3]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == [fake_logprob(t, p, 2).logprob for p, t in
                                              enumerate([105, 33, ord(text[0])], start=1)]
    assert logprobs["top_logprobs"][1] == {"i": fake_logprob(105, 1, 2).logprob, "j": fake_logprob(105, 1, 2).logprob - 1}
    # max_tokens 0: the prompt alone, scored
    zero = http.post("/v1/completions", json={"prompt": "Hi!", "max_tokens": 0, "logprobs": 0, "echo": True})
    body = zero.json()
    assert body["choices"][0]["text"] == "Hi!" and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["logprobs"]["tokens"] == ["H", "i", "!"] and body["usage"]["completion_tokens"] == 0
    # streamed: the echo comes first, the whole equals the non-streamed body
    chunks = stream(http, "/v1/completions", {"prompt": [[72, 105, 33]], "max_tokens": 1, "logprobs": 2,
                                              "echo": True})
    assert chunks[0]["choices"][0]["text"] == "Hi!" + text[0]
    assert chunks[0]["choices"][0]["logprobs"] == logprobs
    plain_echo = http.post("/v1/completions", json={"prompt": "Hi!", "max_tokens": 2, "echo": True}).json()
    assert plain_echo["choices"][0] == {"index": 0, "text": "Hi!" + text[:2], "logprobs": None, "finish_reason": "length"}


# -- tools ---------------------------------------------------------------------------------------------------
def test_tool_calls_whole_and_streamed(tools_server):
    http, tokenizer, engine = tools_server
    body = {"messages": MSGS, "tools": TOOLS}
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    message = whole["message"]
    assert message["content"] == "Let me check."
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert tokenizer.template_calls[-1]["tools"] == TOOLS  # rendered by the template
    chunks = stream(http, "/v1/chat/completions", body)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    calls = [tc for d in deltas for tc in d.get("tool_calls", ())]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["function"] == call["function"]
    assert not any("<tool_call>" in d.get("content", "") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_and_named(tools_server):
    http, tokenizer, engine = tools_server
    none = http.post("/v1/chat/completions", json={"messages": MSGS, "tools": TOOLS, "tool_choice": "none"}).json()
    assert tokenizer.template_calls[-1]["tools"] is None  # not rendered, and the reply is not parsed
    assert none["choices"][0]["message"]["content"].endswith("</tool_call>")
    assert none["choices"][0]["finish_reason"] == "stop"
    named = {"messages": MSGS, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    prompt_tokens = http.post("/v1/chat/completions", json=named).json()["usage"]["prompt_tokens"]
    constraint = engine.requests[-1].sampling.constraint  # a named call is a grammar on the reply, not a prompt
    auto_tokens = http.post("/v1/chat/completions", json={**named, "tool_choice": "auto"}).json()["usage"]["prompt_tokens"]
    assert prompt_tokens == auto_tokens and engine.requests[-1].sampling.constraint is None
    assert constraint.origin == "tool_choice" and "get_weather" in constraint.grammar and "<tool_call>" in constraint.grammar
    unknown = http.post("/v1/chat/completions", json={**named, "tool_choice": {"type": "function", "function": {
        "name": "nope"}}})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tool_choice"


def test_without_tool_support_only_tool_choice_none_is_served(http):
    refused = http.post("/v1/chat/completions", json={"messages": MSGS, "tools": TOOLS, "max_tokens": 3})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "tools_not_supported"
    served = http.post("/v1/chat/completions", json={"messages": MSGS, "tools": TOOLS, "tool_choice": "none",
                                                      "max_tokens": 3})
    assert served.status_code == 200 and served.json()["choices"][0]["message"]["content"] == render_reply(3)[0]


def test_parallel_tool_calls_false_keeps_the_first_call():
    two = CALL + "\n" + CALL.replace("Paris", "Rome")
    with serve(FakeEngine(script=two, max_model_len=1024), FakeTokenizer(chat_template=HERMES_FAKE_TEMPLATE)) as server:
        server.wait_healthy()
        url = f"{server.base_url}/v1/chat/completions"
        both = httpx.post(url, json={"messages": MSGS, "tools": TOOLS}).json()["choices"][0]["message"]["tool_calls"]
        assert [json.loads(c["function"]["arguments"])["city"] for c in both] == ["Paris", "Rome"]
        one = httpx.post(url, json={"messages": MSGS, "tools": TOOLS, "parallel_tool_calls": False}).json()
        assert len(one["choices"][0]["message"]["tool_calls"]) == 1


def test_history_tool_calls_reach_the_template_with_object_arguments(tools_server):
    http, tokenizer, engine = tools_server
    history = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = http.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS, "max_tokens": 3,
                                                     "chat_template_kwargs": {"enable_thinking": False}})
    assert reply.status_code == 200
    assert tokenizer.template_calls[-1]["enable_thinking"] is False
    prompt = reply.json()["usage"]["prompt_tokens"]
    expected = ("".join(f"<tools>{json.dumps(t)}\n" for t in TOOLS) + "<user>Say hello\n<assistant>"
                + '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>\n<tool>sunny\n'
                + "<assistant>")
    assert prompt == len(expected)
    bad = http.post("/v1/chat/completions", json={"messages": MSGS, "chat_template_kwargs": {"tools": []}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"


# -- metrics -------------------------------------------------------------------------------------------------
def test_vllm_spec_decode_counters(http):
    before = scrape_metrics(http)
    assert http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 12}).status_code == 200
    after = scrape_metrics(http)
    labels = '{engine="0",model_name="fake-model"}'

    def delta(name: str) -> float:
        return after[name + labels] - before.get(name + labels, 0)

    # 4 events of 3 tokens: 3 verified trees of 4 draft tokens, each accepting 2
    assert delta("vllm:spec_decode_num_drafts_total") == 3
    assert delta("vllm:spec_decode_num_draft_tokens_total") == 12
    assert delta("vllm:spec_decode_num_accepted_tokens_total") == 6
    per_pos = 'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="fake-model",position="%d"}'
    assert [after[per_pos % p] - before.get(per_pos % p, 0) for p in (0, 1)] == [3, 3]
    assert per_pos % 2 not in after
