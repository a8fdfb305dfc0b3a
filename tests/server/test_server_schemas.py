"""Request schemas, unsupported-parameter detection, prompt building and sampling parameters (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.errors import APIError
from server.prompting import PromptBuilder
from server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from server.serving import GenerationService
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
    assert request.requested_max_tokens() is None


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=5, max_completion_tokens=7).requested_max_tokens() == 7
    assert chat(max_tokens=5).requested_max_tokens() == 5


@pytest.mark.parametrize("fields, names", [
    ({"n": 2}, ["n"]),
    ({"logprobs": True, "top_logprobs": 2}, ["logprobs", "top_logprobs"]),
    ({"presence_penalty": 0.5, "frequency_penalty": -1.0}, ["presence_penalty", "frequency_penalty"]),
    ({"logit_bias": {"42": 1.0}}, ["logit_bias"]),
    ({"response_format": {"type": "json_object"}}, ["response_format (json_object)"]),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, ["tools", "tool_choice"]),
    ({"stream_options": {"include_usage": True}}, ["stream_options (only with stream=true)"]),
])
def test_unsupported_chat_parameters_are_named(fields, names):
    assert chat(**fields).unsupported_parameters() == names


def test_default_valued_unsupported_parameters_are_fine():
    request = chat(n=1, logprobs=False, presence_penalty=0.0, logit_bias={}, response_format={"type": "text"},
                   tool_choice="none", user="u", metadata={"k": "v"}, store=False)
    assert request.unsupported_parameters() == []


def test_unsupported_completion_parameters():
    request = CompletionRequest.model_validate({"prompt": "x", "echo": True, "best_of": 3, "logprobs": 2,
                                                "suffix": "s"})
    assert request.unsupported_parameters() == ["echo", "suffix", "best_of", "logprobs"]
    assert CompletionRequest.model_validate({"prompt": "x"}).max_tokens == 16  # OpenAI's default


@pytest.mark.parametrize("fields", [
    {"max_tokens": "5"}, {"max_tokens": 5.5}, {"temperature": "hot"}, {"temperature": 3.0}, {"top_p": 0},
    {"stream": "yes"}, {"stop": ""}, {"stop": ["a", ""]}, {"stop": [1]}, {"unknown_field": 1}, {"n": True},
    {"messages": []}, {"messages": [{"role": "tool", "content": "x"}]},
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
    return GenerationService.sampling_params(request or chat(), **kwargs)


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
