"""Request and response schemas of the OpenAI-compatible API (the protocol layer; no logic).

Requests are strict about types (a string is not an integer) and tolerant about fields, like vLLM,
llama.cpp and TGI: an unknown field is ignored (`ignored_fields()` names it; the server logs it once and
lists it in the `X-SubSpec-Ignored-Fields` response header). Known parameters this server cannot honour are
accepted at their default values and otherwise rejected with a 400 that names them
(`unsupported_parameters()`), so a client never silently gets different output than it asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from subspec_core.types import MAX_LOGPROBS

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1



def _check_metadata(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        if len(key) > 64:
            raise ValueError(f"metadata keys may be at most 64 characters; one has {len(key)}")
        if len(item) > 512:
            raise ValueError(f"metadata values may be at most 512 characters; one has {len(item)}")
    return value


# OpenAI's limits on `metadata`: 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[dict[str, str], Field(max_length=16, json_schema_extra={
    "propertyNames": {"maxLength": 64}, "additionalProperties": {"type": "string", "maxLength": 512}}),
    AfterValidator(_check_metadata)]


class TolerantModel(BaseModel):
    """Strict types; unknown fields are kept aside (in `model_extra`) and reported, never used."""

    model_config = ConfigDict(extra="allow", strict=True)

    def ignored_fields(self) -> list[str]:
        """Unknown fields set to something (null asks for nothing), nested ones as `messages[].refusal`."""
        names: list[str] = []
        _collect_ignored(self, "", names)
        return list(dict.fromkeys(names))


def _collect_ignored(model: BaseModel, prefix: str, names: list[str]) -> None:
    names.extend(prefix + key for key, value in (model.model_extra or {}).items() if value is not None)
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _collect_ignored(value, f"{prefix}{name}.", names)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _collect_ignored(item, f"{prefix}{name}[].", names)


class StreamOptions(TolerantModel):
    include_usage: bool = Field(False, description="Send a final chunk with token usage (and `usage: null` before).")
    continuous_usage_stats: bool = Field(
        False, description="vLLM extension: every chunk carries the usage so far.")


class ContentPart(TolerantModel):
    """A part of a message's content; only `{"type": "text", "text": ...}` is supported."""

    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported; only 'text' parts are")
        return value


class FunctionCall(TolerantModel):
    name: str
    arguments: str | dict[str, Any] = Field(description="The arguments as JSON text (an object is accepted too).")


class MessageToolCall(TolerantModel):
    """A tool call in an assistant message of the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(TolerantModel):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="`developer` is treated as `system`; `tool` carries a tool call's result.")
    content: str | list[ContentPart] | None = Field(None, description="A string or a list of text parts.")
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, description="An assistant message's tool calls.")
    tool_call_id: str | None = Field(None, description="The call a `tool` message answers.")

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class FunctionDefinition(TolerantModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="The arguments as a JSON Schema object.")
    strict: bool | None = None


class Tool(TolerantModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(TolerantModel):
    name: str


class NamedToolChoice(TolerantModel):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(TolerantModel):
    """`text` (free), `json_object` (any JSON object) or `json_schema` (`json_schema`: `{"name", "schema",
    "strict"}`): the reply is constrained to it."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == [] or value == ""


class SamplingFields(TolerantModel):
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
    metadata: Metadata | None = Field(None, description="Accepted and ignored (at most 16 pairs, keys up to 64 "
                                                        "characters, values up to 512).")
    store: bool | None = Field(None, description="Accepted and ignored.")
    service_tier: str | None = Field(None, description="Accepted and ignored.")
    # Parameters accepted only at their defaults (OpenAI's, then vLLM's extensions).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    prompt_logprobs: int | None = Field(None, description="Not supported; use /v1/completions with echo + logprobs.")
    # Structured outputs, vLLM's extension (server/api/structured.py reads and checks them)
    structured_outputs: dict[str, Any] | None = Field(
        None, description="Extension: constrain the output to `json` (a JSON schema), `regex`, `choice` (a list "
                          "of strings) or `grammar` (Lark, or GBNF with `root ::=`).")
    guided_json: Any = Field(None, description="Extension (vLLM's older name): structured_outputs.json.")
    guided_regex: str | None = Field(None, description="Extension: structured_outputs.regex.")
    guided_choice: list[str] | None = Field(None, description="Extension: structured_outputs.choice.")
    guided_grammar: str | None = Field(None, description="Extension: structured_outputs.grammar.")
    response_format: ResponseFormat | None = Field(
        None, description="`text`, `json_object` or `json_schema`: the reply is constrained to it.")

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
        """A final usage chunk when streaming."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        """Usage on every streamed chunk."""
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def _unsupported_common(self) -> list[str]:
        defaults = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0,
                    "min_tokens": 0, "include_stop_str_in_output": False, "skip_special_tokens": True,
                    "use_beam_search": False}
        names = [] if self.n == 1 else ["n"]
        names += [name for name, default in defaults.items() if getattr(self, name) != default]
        names += [name for name in ("logit_bias", "stop_token_ids", "prompt_logprobs") if not _empty(getattr(self, name))]
        if self.stream_options is not None and not self.stream:
            names.append("stream_options (only with stream=true)")
        return names


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation; at least one message.")
    max_tokens: int | None = Field(None, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(
        None, description="Most tokens to generate; default: the rest of the context window.")
    logprobs: bool | None = Field(None, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="With logprobs: this many most likely tokens per position.")
    tools: list[Tool] | None = Field(None, description="Functions the model may call (needs a chat template "
                                                       "with tool support).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or a named function.")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per reply.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extension: extra variables for the chat template (e.g. enable_thinking).")
    prediction: dict[str, Any] | None = Field(None, description="Accepted and ignored (it never changes output).")
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = Field(None, description="Only text.")
    audio: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None

    def unsupported_parameters(self) -> list[str]:
        """Names of parameters set to values this server cannot honour."""
        names = self._unsupported_common()
        if self.functions:
            names.append("functions (use tools)")
        if self.function_call not in (None, "none", "auto"):
            names.append("function_call (use tool_choice)")
        if self.modalities not in (None, [], ["text"]):
            names.append("modalities")
        for name in ("audio", "reasoning_effort", "web_search_options"):
            if not _empty(getattr(self, name)):
                names.append(name)
        return names


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="One prompt: a string, or a list of token ids (a one-element list is also accepted).")
    max_tokens: int | None = Field(16, description="Most tokens to generate (OpenAI's default: 16); 0 only with "
                                                   "echo; null: the rest of the context window.")
    echo: bool = Field(False, description="Return the prompt before the completion (with logprobs: its tokens' "
                                          "logprobs, the first null).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Each token's log-probability and this "
                                                                          "many most likely tokens per position.")
    suffix: str | None = None
    best_of: int | None = Field(None, description="Only 1 is supported.")

    def unsupported_parameters(self) -> list[str]:
        names = self._unsupported_common()
        if self.suffix:
            names.append("suffix")
        if self.best_of not in (None, 1):
            names.append("best_of")
        return names


# -- responses (for the OpenAPI document) ------------------------------------------------------------------
class SpeculativeUsage(BaseModel):
    """What speculation did for this request: target forwards after the prefill, draft tokens verified, draft
    tokens accepted, and tokens per target forward (accepted + the bonus token)."""

    iterations: int
    drafted_tokens: int
    accepted_tokens: int
    mean_accept_length: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    speculative: SpeculativeUsage | None = None


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
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
    logprobs: dict[str, Any] | None = None
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
