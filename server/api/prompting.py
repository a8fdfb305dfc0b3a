"""Turn chat messages or a completion prompt into prompt token ids, with the model's own tokenizer.

Runs in the API process with a weights-free tokenizer (`subspec_core.api_tokenizer`), so a bad
or too-long prompt is rejected before it is queued. Chat uses the tokenizer's chat template (or the one the
server was given with `--chat-template`), which also renders tools, assistant tool calls and tool results;
the templated text already holds any BOS token, so it is encoded without adding special tokens again.

A text longer than the context could hold even at the vocabulary's longest token is refused by its character
count, before it is tokenized. Preparation runs on `PromptPool`'s threads, off the event loop: small
requests have lanes of their own, so a burst of maximum-size bodies cannot delay everyone.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

from server.api.errors import APIError, bad_request
from server.api.schemas import ChatMessage, MessageToolCall, Tool
from server.api.tool_calls import ToolFormat, tool_format_for_template

# apply_chat_template arguments the server sets itself; chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_ARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template",
                                     "add_generation_prompt", "continue_final_message", "tokenize", "return_dict"})


def _call_entry(call: MessageToolCall) -> dict[str, Any]:
    """An assistant tool call as chat templates expect it: the arguments as an object (OpenAI sends JSON
    text; templates such as Qwen2.5's render `arguments | tojson`), left as text if it is not JSON."""
    arguments: Any = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    entry: dict[str, Any] = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    if call.id is not None:
        entry["id"] = call.id
    return entry


def _message_entry(message: ChatMessage) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                             "content": message.text()}
    if message.name:
        entry["name"] = message.name
    if message.tool_calls:
        entry["tool_calls"] = [_call_entry(call) for call in message.tool_calls]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    return entry


def longest_token_chars(tokenizer: Any) -> int | None:
    """An upper bound on the characters one token stands for: the longest vocabulary entry (byte-level BPE
    spells each byte as one character, so an entry is never shorter than its text); None when the tokenizer
    does not list its vocabulary."""
    vocab = getattr(tokenizer, "get_vocab", None)
    if vocab is None:
        return None
    return max((len(token) for token in vocab()), default=None)


class PromptBuilder:
    """Chat template + tokenization for one tokenizer. Encoding without truncation or padding only reads the
    tokenizer (transformers changes the Rust tokenizer's settings only when they differ from none), so one
    builder serves every prompt thread."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = len(tokenizer)
        self._override = chat_template  # replaces the tokenizer's template when set
        self._token_chars = longest_token_chars(tokenizer)

    @property
    def chat_template(self) -> str | None:
        """The template text chat requests are rendered with (a named set's default), or None."""
        template = self._override or getattr(self._tokenizer, "chat_template", None)
        if isinstance(template, dict):  # a tokenizer with named templates
            template = template.get("tool_use") or template.get("default")
        return template or None

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    @property
    def tool_format(self) -> ToolFormat | None:
        """The tool-call format the template teaches the model; None: the template has no tool support."""
        return tool_format_for_template(self.chat_template)

    def chat(self, messages: Sequence[ChatMessage], *, tools: Sequence[Tool] | None = None,
             template_kwargs: dict[str, Any] | None = None, param: str = "messages",
             max_model_len: int | None = None) -> list[int]:
        """Prompt ids for a conversation, ending with the start of the assistant's turn.
        `param` names the request field the messages came from, in errors."""
        if not self.has_chat_template:
            raise APIError(400, "this model's tokenizer has no chat template, so it cannot format a "
                                "conversation; use /v1/completions with a plain prompt, or serve the "
                                "model with a tokenizer that has one (--tokenizer) or with --chat-template FILE",
                           param=param, code="no_chat_template")
        extra = dict(template_kwargs or {})
        reserved = sorted(_RESERVED_TEMPLATE_ARGS & set(extra))
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs",
                              code="invalid_value")
        if tools:
            extra["tools"] = [tool.model_dump(exclude_none=True) for tool in tools]
        if self._override is not None:
            extra["chat_template"] = self._override
        conversation = [_message_entry(message) for message in messages]
        try:
            text = self._tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                                       **extra)
        except Exception as exc:  # the template rejected the conversation (e.g. roles must alternate)
            raise bad_request(f"the chat template rejected these messages: {str(exc)[:500]}", param=param,
                              code="invalid_value") from exc
        self._check_length(text, max_model_len, param)
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def completion(self, prompt: str | list[str] | list[int] | list[list[int]], *,
                   max_model_len: int | None = None) -> list[int]:
        """Prompt ids for one completion prompt: text (special tokens added) or token ids."""
        prompt = self.single_prompt(prompt)
        if isinstance(prompt, str):
            self._check_length(prompt, max_model_len, "prompt")
            ids = list(self._tokenizer.encode(prompt, add_special_tokens=True)) if prompt else []
        else:
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < self._vocab_size]
            if bad:
                raise bad_request(f"token ids must be in [0, {self._vocab_size}); got {bad[:5]}", param="prompt",
                                  code="invalid_value")
        if not ids:
            raise bad_request("the prompt is empty", param="prompt", code="invalid_value")
        return ids

    def _check_length(self, text: str, max_model_len: int | None, param: str) -> None:
        """400 for a text that cannot fit `max_model_len` tokens whatever it says, before tokenizing it."""
        if max_model_len is None or self._token_chars is None:
            return
        limit = max_model_len * self._token_chars
        if len(text) > limit:
            raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, your "
                              f"prompt has {len(text)} characters, more than {max_model_len} tokens can hold. "
                              f"Please shorten the prompt.", param=param, code="context_length_exceeded")

    @staticmethod
    def single_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> str | list[int]:
        """The one prompt of a request (a one-element batch is unwrapped; larger batches are a 400)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request("batched prompts are not supported: send one prompt per request",
                                  param="prompt", code="unsupported_parameter")
            return prompt[0]
        return prompt

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of prompt ids (for `echo` of a token-id prompt), as the engine decodes output."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


T = TypeVar("T")

SMALL_BODY_BYTES = 64 * 1024  # a body up to this size takes the small lane


class PromptPool:
    """Threads that prepare prompts off the event loop: a lane for small bodies and one for large ones, so
    large bodies in flight delay each other, never a small request."""

    def __init__(self, *, threads_per_lane: int = 2) -> None:
        self._small = ThreadPoolExecutor(max_workers=threads_per_lane, thread_name_prefix="subspec-prompt")
        self._large = ThreadPoolExecutor(max_workers=threads_per_lane, thread_name_prefix="subspec-prompt-large")

    async def run(self, body_bytes: int, prepare: Callable[..., T], *args: Any) -> T:
        """`prepare(*args)` on the lane for a body of `body_bytes` (its APIErrors propagate)."""
        lane = self._small if body_bytes <= SMALL_BODY_BYTES else self._large
        return await asyncio.get_running_loop().run_in_executor(lane, prepare, *args)

    def close(self) -> None:
        """Let the threads go (at app shutdown)."""
        for lane in (self._small, self._large):
            lane.shutdown(wait=False, cancel_futures=True)
