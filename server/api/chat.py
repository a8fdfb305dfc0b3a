"""POST /v1/chat/completions: messages (and tools) through the chat template; `chat.completion(.chunk)` bodies.

Tools: the template renders them and the reply is parsed into `tool_calls` with the parser of the template's
format (server/api/tool_calls.py); `tool_choice` "required" or a named function constrains the reply to calls
in that format whose arguments match the functions' `parameters` (server/api/structured.py); `none` leaves the
tools out entirely. `response_format` and the structured-output extensions constrain the reply too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from server.api.choices import ChoiceBuilder, ChoicesEndpoint
from server.api.endpoint import Prepared
from server.api.errors import APIError, bad_request
from server.api.logprobs import TokenStrings, chat_logprobs
from server.api.prompting import PromptBuilder
from server.api.schemas import ChatCompletionRequest, NamedToolChoice, Tool
from server.api.structured import checked, request_constraint, tool_call_constraint
from server.api.tool_calls import Parsed, ToolCallParser, ToolFormat
from subspec_core.grammar import Constraint
from subspec_core.types import TokenEvent, TokenLogprob


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses tools: what the template renders, how the reply begins and is parsed."""

    tools: list[Tool] | None = None
    format: ToolFormat | None = None
    constraint: Constraint | None = None  # tool_choice required or named: the reply is calls
    max_calls: int | None = None  # None: as many as the model makes


class ChatChoiceBuilder(ChoiceBuilder):
    """Content (or tool calls) and logprobs of one chat reply, streamed as deltas and folded into a message."""

    def __init__(self, *, strings: TokenStrings, logprobs: bool, parser: ToolCallParser | None = None,
                 max_calls: int | None = None) -> None:
        self._strings = strings
        self._want_logprobs = logprobs
        self._parser = parser
        self._max_calls = max_calls
        self._content: list[str] = []
        self._calls: list[dict[str, Any]] = []
        self._entries: list[TokenLogprob] = []
        self._finish = "stop"

    def opening(self) -> dict[str, Any]:
        # OpenAI's first chunk carries the role and an empty content.
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def _delta(self, parsed: Parsed) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if parsed.content:
            self._content.append(parsed.content)
            delta["content"] = parsed.content
        calls = []
        for call in parsed.calls:
            if self._max_calls is not None and len(self._calls) >= self._max_calls:
                break  # parallel_tool_calls false, or a named tool_choice: one call
            entry = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}
            calls.append({"index": len(self._calls), **entry})
            self._calls.append(entry)
        if calls:
            delta["tool_calls"] = calls
        return delta

    def on_event(self, event: TokenEvent) -> dict[str, Any] | None:
        parsed = Parsed(event.text) if self._parser is None else self._parser.feed(event.text)
        delta = self._delta(parsed)
        logprobs = None
        if self._want_logprobs and event.logprobs:
            self._entries.extend(event.logprobs)
            logprobs = chat_logprobs(event.logprobs, self._strings)
        if not delta and logprobs is None:
            return None
        return {"index": 0, "delta": delta or {"content": ""}, "logprobs": logprobs, "finish_reason": None}

    def closing(self, finish_reason: str) -> list[dict[str, Any]]:
        choices = []
        if self._parser is not None:
            delta = self._delta(self._parser.finish())
            if delta:
                choices.append({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})
        self._finish = "tool_calls" if self._calls else finish_reason
        choices.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": self._finish})
        return choices

    def whole(self) -> dict[str, Any]:
        content = "".join(self._content)
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not self._calls else None}
        if self._calls:
            message["tool_calls"] = self._calls
        logprobs = chat_logprobs(self._entries, self._strings) if self._want_logprobs else None
        return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": self._finish}


def completion_budget(request: ChatCompletionRequest) -> tuple[int | None, str]:
    """The most tokens to generate and the field that set it: max_completion_tokens wins over its deprecated
    alias max_tokens (which, when set too, must still be valid)."""
    if request.max_completion_tokens is None:
        return request.max_tokens, "max_tokens"
    if request.max_tokens is not None and request.max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {request.max_tokens}", param="max_tokens",
                          code="invalid_value")
    return request.max_completion_tokens, "max_completion_tokens"


class ChatEndpoint(ChoicesEndpoint):
    endpoint = "/v1/chat/completions"
    id_prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"
    body_object = "chat.completion"
    prompt_param = "messages"

    @staticmethod
    def tool_plan(request: ChatCompletionRequest, prompts: PromptBuilder) -> ToolPlan:
        """Check tools and tool_choice against each other and the chat template (400s), and plan the reply."""
        choice = request.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if not request.tools:
            if named is not None or choice == "required":
                raise bad_request("tool_choice requires tools: give the functions the model may call in `tools`",
                                  param="tool_choice", code="invalid_value")
            return ToolPlan()
        if choice == "none":  # the model may not call tools: it is not told about them, its reply is not parsed
            return ToolPlan()
        fmt = prompts.tool_format
        if fmt is None:
            raise APIError(400, "this model's chat template has no tool support (it shows no tool-call format this "
                                "server can parse: Hermes <tool_call> or Llama 3.1 JSON); serve it with "
                                "--chat-template FILE pointing to a template that renders tools",
                           param="tools", code="tools_not_supported")
        if named is not None and named not in {tool.function.name for tool in request.tools}:
            raise bad_request(f"tool_choice names the function {named!r}, which is not in tools", param="tool_choice",
                              code="invalid_value")
        one_call = named is not None or request.parallel_tool_calls is False
        constraint = None
        if named is not None or choice == "required":
            constraint = tool_call_constraint(fmt, request.tools, named=named, parallel=not one_call)
        return ToolPlan(tools=request.tools, format=fmt, constraint=constraint, max_calls=1 if one_call else None)

    def prepare(self, request: ChatCompletionRequest, prompts: PromptBuilder, max_model_len: int) -> Prepared:
        if request.top_logprobs and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs: true", param="top_logprobs", code="invalid_value")
        plan = self.tool_plan(request, prompts)
        constraint = checked(request_constraint(request), plan.constraint)
        prompt_ids = prompts.chat(request.messages, tools=plan.tools, template_kwargs=request.chat_template_kwargs,
                                  max_model_len=max_model_len)
        max_tokens, param = completion_budget(request)
        builder = ChatChoiceBuilder(strings=self.context.strings, logprobs=bool(request.logprobs),
                                    parser=None if plan.format is None else plan.format.parser(),
                                    max_calls=plan.max_calls)
        return Prepared(prompt_ids, builder, max_tokens, param,
                        logprobs=(request.top_logprobs or 0) if request.logprobs else None, constraint=constraint)
