"""Request schema of POST /v1/responses (OpenAI's Responses API), for text in and text out.

`input` is a string (one user message) or a list of messages whose content is a string or text parts
(`input_text`, or `output_text` in an assistant message taken from an earlier response); `instructions`
becomes the system message. The server is stateless: nothing is stored (`store` is accepted, and the
response says `store: false`), so `previous_response_id` and `conversation` are a 400 that says to send
the whole conversation as `input`. Known Responses parameters this server cannot honour (tools, a
reasoning, logprobs, background) are a 400 that names them; unknown fields too. `text.format` `json_schema`
(`{"type", "name", "schema", "strict"}`) or `json_object` constrains the reply (server/api/structured.py).
Fields are read leniently (`"0.5"` is a valid temperature), as llama.cpp and vLLM do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from server.api.schemas import INT64_MAX, INT64_MIN, ChatMessage, Metadata, TolerantModel

TEXT_PART_TYPES = ("input_text", "output_text", "text")


def _str_or_list(value: Any) -> str:
    return "str" if isinstance(value, str) else "list"


class ResponseInputText(BaseModel):
    """A text content part of an input message (`annotations`, `logprobs`, ... are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value not in TEXT_PART_TYPES:
            raise ValueError(f"content parts of type {value!r} are not supported; only text parts "
                             f"({', '.join(TEXT_PART_TYPES)}) are")
        return value


class ResponseInputMessage(BaseModel):
    """One message of `input`; `id`, `status` and `phase` of an earlier response's output are ignored."""

    model_config = ConfigDict(extra="allow")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"] = Field(
        description="`developer` is treated as `system`.")
    # A string or a list of parts; the discriminator makes a bad list report only the list's errors (the
    # tags are the names server.api.errors leaves out of parameter paths).
    content: Annotated[Union[Annotated[str, Tag("str")], Annotated[list[ResponseInputText], Tag("list")]],
                       Discriminator(_str_or_list)]

    @model_validator(mode="before")
    @classmethod
    def _messages_only(cls, data: Any) -> Any:
        # Say what is wrong with a tool call or reasoning item in one sentence, not as missing fields.
        if isinstance(data, dict) and data.get("type", "message") != "message":
            raise ValueError(f"input items of type {data['type']!r} are not supported; this server takes "
                             "messages with text content only (no tools, no reasoning items)")
        return data

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseTextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"


class ResponseTextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. `verbosity`: a hint this server's models do not take
    format: ResponseTextFormat | None = None


class ResponsesRequest(TolerantModel):
    """POST /v1/responses. Unknown fields are ignored and reported, as on the other endpoints."""

    model: str | None = Field(None, description="The served model name (see /v1/models); defaults to it.")
    input: Annotated[Union[Annotated[str, Tag("str")], Annotated[list[ResponseInputMessage], Tag("list")]],
                     Discriminator(_str_or_list)] = Field(
        description="A string (one user message) or a list of messages with text content.")
    instructions: str | None = Field(None, description="A system message placed before `input`.")
    max_output_tokens: int | None = Field(None, description="Most tokens to generate; default: the rest of "
                                                             "the context window.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; default 1.")
    stream: bool = Field(False, description="Stream the Responses event sequence as server-sent events.")
    store: bool | None = Field(None, description="Accepted; nothing is ever stored (the response says false).")
    previous_response_id: str | None = Field(None, description="Not supported: this server is stateless.")
    conversation: str | dict[str, Any] | None = Field(None, description="Not supported: this server is stateless.")
    metadata: Metadata | None = Field(None, description="Echoed in the response (at most 16 pairs, keys up to 64 "
                                                        "characters, values up to 512).")
    user: str | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    stream_options: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="Input is never truncated: one over the context window is a 400 either way.")
    # Parameters accepted only at values that ask for nothing this server lacks.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: ResponseTextConfig | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    # Extensions, as on /v1/chat/completions.
    top_k: int | None = Field(None, ge=-1, description="Extension: keep the k most likely tokens; 0 or -1 disables.")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="Extension: makes sampling reproducible.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past the end-of-sequence token.")

    def messages(self) -> list[ChatMessage]:
        """The conversation for the chat template: `instructions` as the system message, then `input`."""
        conversation = [] if self.instructions is None else [ChatMessage(role="system", content=self.instructions)]
        if isinstance(self.input, str):
            return [*conversation, ChatMessage(role="user", content=self.input)]
        return [*conversation, *(ChatMessage(role=m.role, content=m.text()) for m in self.input)]

    def stop_strings(self) -> tuple[str, ...]:
        """The Responses API has no stop strings (server.api.endpoint.sampling_params asks for them)."""
        return ()

    def unsupported_parameters(self) -> list[str]:
        """Names of parameters set to values this server cannot honour."""
        names = []
        if self.tools:
            names.append("tools")
        if self.tool_choice not in (None, "auto", "none"):
            names.append("tool_choice")
        if self.text is not None and self.text.format is not None and self.text.format.type not in (
                "text", "json_object", "json_schema"):
            names.append(f"text.format ({self.text.format.type})")
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            names.append("reasoning")
        # Extra data of item kinds this server never produces (reasoning, tool calls) is vacuous; logprobs not.
        if any("logprobs" in item for item in self.include or ()):
            names.append("include (logprobs)")
        if self.top_logprobs:
            names.append("top_logprobs")
        if self.background:
            names.append("background")
        if self.prompt is not None:
            names.append("prompt")
        return names
