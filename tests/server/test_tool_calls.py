"""Tool-call parsers (server/api/tool_calls.py) on outputs in each format as the models write them: complete,
streamed in pieces of every size, several calls, and malformed (which stays content)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.api.tool_calls import (
    HERMES, LLAMA3_JSON, HermesParser, Llama3JsonParser, Parsed, ToolCall, ToolCallParser, tool_format_for_template,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "configs" / "templates"


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def parse(parser: ToolCallParser, pieces: list[str]) -> Parsed:
    """Fold a streamed parse into one result."""
    content, calls = [], []
    for result in [*(parser.feed(p) for p in pieces), parser.finish()]:
        content.append(result.content)
        calls.extend(result.calls)
    return Parsed("".join(content), tuple(calls))


def chunkings(text: str) -> list[list[str]]:
    """The text whole, one character at a time, and in pieces of 2, 3, 5 and 7 characters."""
    return [[text], list(text)] + [[text[i:i + n] for i in range(0, len(text), n)] for n in (2, 3, 5, 7)]


# Qwen2.5 / Qwen3 (Hermes format) replies.
HERMES_CASES = [
    ('<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "San Francisco, CA", "unit": '
     '"fahrenheit"}}\n</tool_call>',
     "", [call("get_current_weather", location="San Francisco, CA", unit="fahrenheit")]),
    ('<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, '
     'USA", "date": "2024-10-01"}}\n</tool_call>',
     "", [call("get_current_temperature", location="San Francisco, CA, USA"),
          call("get_temperature_date", location="San Francisco, CA, USA", date="2024-10-01")]),
    ("Let me look that up.\n\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"query\": \"東京 天気\"}}\n"
     "</tool_call>",
     "Let me look that up.", [call("search", query="東京 天気")]),
    ("<think>\nThe user wants the weather, so I call the tool.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", "
     "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
     "<think>\nThe user wants the weather, so I call the tool.\n</think>", [call("get_weather", city="Paris")]),
    # the reply ended (EOS or a stop) right after the JSON: the call is complete without its closing tag
    ('<tool_call>\n{"name": "ping", "arguments": {}}', "", [call("ping")]),
    # arguments written as a JSON string
    ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>', "", [call("f", x=1)]),
    # no call at all, including text that starts like a tag
    ("The capital of France is Paris. Use <b>bold</b> or <tool", "The capital of France is Paris. Use <b>bold</b> or <tool",
     []),
    ("Line one.\n\nLine two.\n", "Line one.\n\nLine two.\n", []),
    # malformed: stays content exactly as written
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>', []),
    ('<tool_call>\n{"name": "get_weather", "argu', '<tool_call>\n{"name": "get_weather", "argu', []),  # cut by max_tokens
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n{"arguments": {}}\n</tool_call>', []),  # no name
    # one good call, one broken one
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\nnot json\n</tool_call>',
     "<tool_call>\nnot json\n</tool_call>", [call("a")]),
]


@pytest.mark.parametrize("text, content, calls", HERMES_CASES, ids=[f"h{i}" for i in range(len(HERMES_CASES))])
def test_hermes_whole_and_streamed(text, content, calls):
    for pieces in chunkings(text):
        assert parse(HermesParser(), pieces) == Parsed(content, tuple(calls)), pieces


def test_hermes_streams_content_before_the_end_and_each_call_when_it_closes():
    parser = HermesParser()
    assert parser.feed("Sure, ") == Parsed("Sure,")  # the trailing space waits: a call may follow it
    assert parser.feed("one moment.\n<tool_") == Parsed(" one moment.")
    assert parser.feed('call>\n{"name": "a", "arguments": {"k": "v"}}') == Parsed()
    assert parser.feed("\n</tool_call>\n") == Parsed("", (call("a", k="v"),))
    assert parser.feed("<tool_call>\n{\"name\": \"b\"}\n</tool_call>") == Parsed("", (call("b"),))
    assert parser.finish() == Parsed()


LLAMA3_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "",
     [call("get_weather", city="Paris", unit="celsius")]),
    ('<|python_tag|>{"name": "brave_search", "parameters": {"query": "weather in Paris"}}', "",
     [call("brave_search", query="weather in Paris")]),
    ('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": [1, 2]}}', "", [call("a"), call("b", x=[1, 2])]),
    ('  {"name": "a", "arguments": {"y": null}}\n', "", [call("a", y=None)]),
    ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ('{"name": "get_weather", "parameters": {"city": ', '{"name": "get_weather", "parameters": {"city": ', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "a", "parameters": {}} and then some text', '{"name": "a", "parameters": {}} and then some text', []),
]


@pytest.mark.parametrize("text, content, calls", LLAMA3_CASES, ids=[f"l{i}" for i in range(len(LLAMA3_CASES))])
def test_llama3_json_whole_and_streamed(text, content, calls):
    for pieces in chunkings(text):
        assert parse(Llama3JsonParser(), pieces) == Parsed(content, tuple(calls)), pieces


def test_llama3_json_streams_plain_replies_at_once():
    parser = Llama3JsonParser()
    assert parser.feed("The") == Parsed("The")
    assert parser.feed(" answer") == Parsed(" answer")
    assert parser.finish() == Parsed()


def test_format_is_chosen_from_the_chat_template(default_tokenizer):
    assert tool_format_for_template((TEMPLATES / "hermes-tools.jinja").read_text()) is HERMES
    assert tool_format_for_template((TEMPLATES / "llama3.1-json-tools.jinja").read_text()) is LLAMA3_JSON
    llama31 = ('{%- if tools is not none %}{{- "<|start_header_id|>ipython<|end_header_id|>" }}{%- endif %}'
               '{{- \'{"name": function name, "parameters": dictionary of argument name and its value}\' }}'
               '{{- "<|python_tag|>" + tool_call.name }}')
    assert tool_format_for_template(llama31) is LLAMA3_JSON
    assert tool_format_for_template(default_tokenizer.chat_template) is None  # SmolLM2: no tool support
    assert tool_format_for_template(None) is None


@pytest.mark.parametrize("name, fmt, reply_start", [("hermes-tools", HERMES, "<|im_start|>assistant\n"),
                                                    ("llama3.1-json-tools", LLAMA3_JSON, "<|end_header_id|>\n\n")],
                         ids=["hermes", "llama3.1"])
def test_shipped_templates_render_tools_as_their_parser_reads_them(default_tokenizer, name, fmt, reply_start):
    """configs/templates: the tools are shown to the model, and an earlier call is rendered in the format the
    parser of the template's format reads back."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    earlier = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Tokyo"}}}]}
    rendered = default_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Weather in Tokyo?"}, earlier], tools=tools, tokenize=False,
        chat_template=(TEMPLATES / f"{name}.jinja").read_text())
    assert json.dumps(tools[0]) in rendered
    reply = rendered[rendered.rindex(reply_start) + len(reply_start):].removesuffix("\n")
    reply = reply.removesuffix("<|im_end|>").removesuffix("<|eot_id|>")
    assert parse(fmt.parser(), [reply]) == Parsed("", (call("get_weather", city="Tokyo"),))


