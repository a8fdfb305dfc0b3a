"""Tool calling through the real server: the default model with a Hermes-style test template
(`--chat-template`), the OpenAI SDK round trip (tools in, `tool_calls` out, the `tool` result back, an answer),
streamed tool calls, and langchain-openai's `bind_tools`.

A 135M model needs to see the format once: the conversation starts with one worked call (history with an
assistant `tool_calls` message and a `tool` result), and `tool_choice` names the function, which begins the
reply with the call's opening so the model writes the arguments.
"""

from __future__ import annotations

import json

import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}]
WORKED_EXAMPLE = [
    {"role": "user", "content": "What is the weather in Tokyo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature_c": 18, "sky": "cloudy"}'},
    {"role": "assistant", "content": "It is 18 °C and cloudy in Tokyo."},
]
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
RESULT = '{"temperature_c": 21, "sky": "sunny"}'


@pytest.fixture(scope="module")
def sdk(real_server_tools):
    return openai.OpenAI(base_url=f"{real_server_tools.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_sdk_tool_call_round_trip(sdk):
    messages = [*WORKED_EXAMPLE, QUESTION]
    first = sdk.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=NAMED,
                                        max_tokens=24, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # the SDK's message object goes back as it is, then the tool's result
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    second = sdk.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=24, temperature=0)
    answer = second.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "21" in answer.message.content and "Paris" in answer.message.content


def test_sdk_streamed_tool_call(sdk):
    stream = sdk.chat.completions.create(model=MODEL, messages=[*WORKED_EXAMPLE, QUESTION], tools=TOOLS,
                                         tool_choice=NAMED, max_tokens=24, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    finish = []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content  # nothing of the call leaks into content
        for piece in delta.tool_calls or ():
            entry = calls.setdefault(piece.index, {"id": piece.id, "name": "", "arguments": ""})
            entry["name"] += piece.function.name or ""
            entry["arguments"] += piece.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finish.append(chunk.choices[0].finish_reason)
    assert finish == ["tool_calls"] and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert calls[0]["id"].startswith("call_")


def test_langchain_bind_tools(real_server_tools):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city"""
        return RESULT

    llm = ChatOpenAI(base_url=f"{real_server_tools.base_url}/v1", api_key="unused", model=MODEL, temperature=0,
                     max_tokens=24, max_retries=0, timeout=120)
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    history = [HumanMessage("What is the weather in Tokyo?"),
               AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Tokyo"}, "id": "call_0"}]),
               ToolMessage('{"temperature_c": 18, "sky": "cloudy"}', tool_call_id="call_0"),
               AIMessage("It is 18 °C and cloudy in Tokyo."),
               HumanMessage("What is the weather in Paris?")]
    reply = bound.invoke(history)
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "Paris"})]
    result = get_weather.invoke(reply.tool_calls[0])  # a ToolMessage answering the call
    answer = llm.bind_tools([get_weather]).invoke([*history, reply, result])
    assert not answer.tool_calls and "21" in answer.content
