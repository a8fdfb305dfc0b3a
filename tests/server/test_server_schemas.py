"""Request schemas, unsupported-parameter detection, prompt building and sampling parameters (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.api.errors import APIError
from server.api.prompting import PromptBuilder
from server.api.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from server.api.chat import completion_budget
from server.api.endpoint import sampling_params
from tests.server.server_fakes import FakeTokenizer


def chat(**fields):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_chat_request_defaults_and_text_parts():
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]})
    assert [m.text() for m in request.messages] == ["be brief", "ab", ""]
    assert request.n == 1 and request.stream is False and request.unsupported_parameters() == []
    assert completion_budget(request) == (None, "max_tokens")


def test_max_completion_tokens_wins_over_max_tokens():
    assert completion_budget(chat(max_tokens=5, max_completion_tokens=7)) == (7, "max_completion_tokens")
    assert completion_budget(chat(max_tokens=5)) == (5, "max_tokens")


@pytest.mark.parametrize("fields, names", [
    ({"n": 2}, ["n"]),
    ({"presence_penalty": 0.5, "frequency_penalty": -1.0}, ["presence_penalty", "frequency_penalty"]),
    ({"repetition_penalty": 1.1, "min_p": 0.05, "min_tokens": 3}, ["repetition_penalty", "min_p", "min_tokens"]),
    ({"include_stop_str_in_output": True, "skip_special_tokens": False, "use_beam_search": True},
     ["include_stop_str_in_output", "skip_special_tokens", "use_beam_search"]),
    ({"logit_bias": {"42": 1.0}, "stop_token_ids": [7], "prompt_logprobs": 1},
     ["logit_bias", "stop_token_ids", "prompt_logprobs"]),
    # structured outputs are served (server/api/structured.py): none of them is an unsupported parameter
    ({"guided_json": {}, "guided_regex": "a+", "guided_choice": ["a"], "guided_grammar": "g", "structured_outputs":
      {"json": {}}}, []),
    ({"response_format": {"type": "json_object"}}, []),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, []),
    ({"functions": [{"name": "f"}], "function_call": {"name": "f"}},
     ["functions (use tools)", "function_call (use tool_choice)"]),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy"}}, ["modalities", "audio"]),
    ({"reasoning_effort": "high", "web_search_options": {"search_context_size": "low"}},
     ["reasoning_effort", "web_search_options"]),
    ({"stream_options": {"include_usage": True}}, ["stream_options (only with stream=true)"]),
])
def test_unsupported_chat_parameters_are_named(fields, names):
    assert chat(**fields).unsupported_parameters() == names


def test_default_valued_unsupported_parameters_are_fine():
    request = chat(n=1, logprobs=False, top_logprobs=0, presence_penalty=0.0, logit_bias={}, stop_token_ids=[],
                   response_format={"type": "text"}, tool_choice="none", user="u", metadata={"k": "v"}, store=False,
                   modalities=[], web_search_options={}, audio=None, function_call="auto", min_tokens=0,
                   skip_special_tokens=True, guided_json=None, prediction={"type": "content", "content": "x"})
    assert request.unsupported_parameters() == [] and request.ignored_fields() == []
    assert chat(modalities=["text"], stream=True, stream_options={"continuous_usage_stats": True}
                ).unsupported_parameters() == []


def test_unsupported_completion_parameters():
    request = CompletionRequest.model_validate({"prompt": "x", "echo": True, "best_of": 3, "logprobs": 2,
                                                "suffix": "s"})
    assert request.unsupported_parameters() == ["suffix", "best_of"]  # echo and logprobs are supported
    assert CompletionRequest.model_validate({"prompt": "x", "best_of": 1, "suffix": ""}).unsupported_parameters() == []
    assert CompletionRequest.model_validate({"prompt": "x"}).max_tokens == 16  # OpenAI's default


def test_unknown_fields_are_ignored_and_named_nested_ones_too():
    request = chat(frobnicate=1, verbosity="low", prompt_cache_key="k", stream=True, nothing=None,
                   stream_options={"include_usage": True, "include_obfuscation": False},
                   messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]},
                             {"role": "assistant", "content": "x", "refusal": None, "annotations": []}])
    assert request.unsupported_parameters() == []
    assert request.ignored_fields() == ["frobnicate", "verbosity", "prompt_cache_key", "stream_options.include_obfuscation",
                                        "messages[].content[].cache_control", "messages[].annotations"]
    assert CompletionRequest.model_validate({"prompt": "x", "foo": [1]}).ignored_fields() == ["foo"]


def test_tool_messages_and_tool_definitions_validate():
    request = chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                   tool_choice={"type": "function", "function": {"name": "f"}}, parallel_tool_calls=False,
                   messages=[{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                             {"role": "tool", "tool_call_id": "c1", "content": "42"}])
    assert request.tool_choice.function.name == "f" and request.messages[2].text() == "42"
    for bad in ({"tool_choice": "sometimes"}, {"tools": [{"type": "custom", "custom": {}}]},
                {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]}):
        with pytest.raises(ValidationError):
            chat(**bad)


@pytest.mark.parametrize("fields", [
    {"max_tokens": "5"}, {"max_tokens": 5.5}, {"temperature": "hot"}, {"temperature": 3.0}, {"top_p": 0},
    {"stream": "yes"}, {"stop": ""}, {"stop": ["a", ""]}, {"stop": [1]}, {"n": True}, {"logprobs": 1},
    {"top_logprobs": -1}, {"messages": []}, {"messages": [{"role": "function", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
])
def test_invalid_requests_fail_validation(fields):
    with pytest.raises(ValidationError):
        chat(**fields)


def test_integer_temperature_is_accepted():
    assert chat(temperature=0).temperature == 0.0


def test_prompt_builder_chat_and_completion():
    builder = PromptBuilder(FakeTokenizer())
    ids = builder.chat([ChatMessage(role="developer", content="sys"), ChatMessage(role="user", content="hi")])
    assert "".join(map(chr, ids)) == "<system>sys\n<user>hi\n<assistant>"
    assert builder.completion("abc") == [97, 98, 99]
    assert builder.completion(["abc"]) == [97, 98, 99]
    assert builder.completion([5, 6]) == [5, 6]
    assert builder.completion([[5, 6]]) == [5, 6]


@pytest.mark.parametrize("prompt", ["", [], ["a", "b"], [[1], [2]], [-1], [0x110000]])
def test_bad_completion_prompts(prompt):
    with pytest.raises(APIError) as info:
        PromptBuilder(FakeTokenizer()).completion(prompt)
    assert info.value.status_code == 400 and info.value.param == "prompt"


def test_chat_without_template_is_a_clear_400():
    with pytest.raises(APIError) as info:
        PromptBuilder(FakeTokenizer(chat_template=None)).chat([ChatMessage(role="user", content="hi")])
    assert info.value.status_code == 400 and info.value.code == "no_chat_template"
    assert "chat template" in info.value.message


def test_template_errors_become_400():
    with pytest.raises(APIError) as info:
        PromptBuilder(FakeTokenizer()).chat([ChatMessage(role="system", content="a"),
                                             ChatMessage(role="system", content="b")])
    assert info.value.status_code == 400 and "only one system message" in info.value.message


def params(request=None, **kwargs):
    kwargs = {"prompt_len": 10, "max_model_len": 100, "max_tokens": None, "max_tokens_param": "max_tokens",
              "prompt_param": "messages", **kwargs}
    return sampling_params(request or chat(), **kwargs)


def test_sampling_params_mapping():
    sampling = params(chat(temperature=0, top_p=0.5, top_k=-1, seed=3, stop="x", ignore_eos=True), max_tokens=7)
    got = (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed)
    assert got == (7, 0.0, 0.5, 0, 3)
    assert sampling.stop == ("x",) and sampling.ignore_eos and sampling.greedy
    default = params()
    assert default.max_tokens == 90 and default.temperature == 1.0 and default.top_p == 1.0 and default.top_k == 0


@pytest.mark.parametrize("kwargs, code", [
    ({"max_tokens": 0}, "invalid_value"), ({"max_tokens": -3}, "invalid_value"),
    ({"max_tokens": 91}, "context_length_exceeded"), ({"prompt_len": 100}, "context_length_exceeded"),
])
def test_sampling_params_limits(kwargs, code):
    with pytest.raises(APIError) as info:
        params(**kwargs)
    assert info.value.status_code == 400 and info.value.code == code
