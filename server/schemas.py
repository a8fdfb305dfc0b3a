"""Request and response schemas of the OpenAI-compatible API (the protocol layer; no logic).

Requests are strict (a string is not an integer) and closed: an unknown field is a 400 that names it, as
OpenAI does. Known OpenAI parameters this server does not implement are accepted at their default
values and rejected with a 400 otherwise (`unsupported_parameters`), so a client never silently gets
different behaviour than it asked for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a final chunk with token usage (and `usage: null` before).")
    continuous_usage_stats: bool = Field(False, description="Not supported (must be false).")


class ContentPart(BaseModel):
    """A part of a message's content; only `{"type": "text", "text": ...}` is supported."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported; only 'text' parts are")
        return value


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is treated as `system`; tool and function messages are not supported.")
    content: str | list[ContentPart] | None = Field(None, description="A string or a list of text parts.")
    name: str | None = None

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingFields(_Strict):
    """Fields shared by chat and text completions."""

    model: str | None = Field(None, description="The served model name (see /v1/models); defaults to it.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; default 1.")
    top_k: int | None = Field(None, ge=-1, description="Extension: keep the k most likely tokens; 0 or -1 disables.")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="Makes sampling reproducible.")
    stop: str | list[str] | None = Field(None, description="Up to 16 strings that end the completion (not included).")
    stream: bool = Field(False, description="Stream chunks as server-sent events.")
    stream_options: StreamOptions | None = None
    n: int = Field(1, description="Only 1 is supported.")
    user: str | None = Field(None, description="Accepted and ignored.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past the end-of-sequence token.")
    # OpenAI parameters accepted only at their defaults.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(None, description="Accepted and ignored.")
    service_tier: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        values = [value] if isinstance(value, str) else (value or [])
        if len(values) > 16:
            raise ValueError("at most 16 stop strings are supported")
        if any(not s for s in values):
            raise ValueError("stop strings must be non-empty")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _unsupported_common(self) -> list[str]:
        names = []
        if self.n != 1:
            names.append("n")
        if self.presence_penalty != 0.0:
            names.append("presence_penalty")
        if self.frequency_penalty != 0.0:
            names.append("frequency_penalty")
        if self.repetition_penalty != 1.0:
            names.append("repetition_penalty")
        if self.min_p != 0.0:
            names.append("min_p")
        if self.logit_bias:
            names.append("logit_bias")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            names.append("stream_options.continuous_usage_stats")
        if self.stream_options is not None and not self.stream:
            names.append("stream_options (only with stream=true)")
        return names


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation; at least one message.")
    max_tokens: int | None = Field(None, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(
        None, description="Most tokens to generate; default: the rest of the context window.")
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported_parameters(self) -> list[str]:
        """Names of parameters set to values this server cannot honour."""
        names = self._unsupported_common()
        if self.logprobs:
            names.append("logprobs")
        if self.top_logprobs:
            names.append("top_logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            names.append(f"response_format ({self.response_format.type})")
        if self.tools:
            names.append("tools")
        if self.tool_choice not in (None, "none"):
            names.append("tool_choice")
        if self.functions:
            names.append("functions")
        if self.function_call not in (None, "none"):
            names.append("function_call")
        if self.modalities is not None and self.modalities != ["text"]:
            names.append("modalities")
        for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
            if getattr(self, name) is not None:
                names.append(name)
        return names


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="One prompt: a string, or a list of token ids (a one-element list is also accepted).")
    max_tokens: int | None = Field(16, description="Most tokens to generate (OpenAI's default: 16); "
                                                   "null: the rest of the context window.")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def unsupported_parameters(self) -> list[str]:
        names = self._unsupported_common()
        if self.echo:
            names.append("echo")
        if self.suffix:
            names.append("suffix")
        if self.best_of not in (None, 1):
            names.append("best_of")
        if self.logprobs is not None:
            names.append("logprobs")
        return names


# -- responses ------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "subspec"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
