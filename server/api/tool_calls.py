"""Tool calls in model output: the formats of the model families we load, parsed as the text streams in.

- Hermes (Qwen2.5, Qwen3, Hermes models): optional text, then one block per call,
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`.
- Llama 3.1 JSON: the whole reply is the call(s), `{"name": "f", "parameters": {...}}` (after an optional
  `<|python_tag|>`), several separated by `;`.

The format is chosen from the chat template (`tool_format_for_template`); a template that shows neither has
no tool support. Parsers are incremental (`feed` text as it is generated, `finish` at the end) so streamed
and whole responses come from the same code; text that does not parse as a call stays content.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Parsed:
    """What one `feed` or `finish` released: content text to emit now, and calls completed now."""

    content: str = ""
    calls: tuple[ToolCall, ...] = ()


def call_from_json(text: str, argument_keys: tuple[str, ...]) -> ToolCall | None:
    """A call from one JSON object `{"name": str, <argument key>: object}`; None if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return _call_from_object(value, argument_keys)


def _call_from_object(value: Any, argument_keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments: Any = {}
    for key in argument_keys:
        if key in value:
            arguments = value[key]
            break
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _held_length(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it may still become one)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolCallParser(ABC):
    """Splits a reply into content and tool calls, incrementally."""

    @abstractmethod
    def feed(self, text: str) -> Parsed:
        """Take the next piece of the reply; return what is final so far."""

    @abstractmethod
    def finish(self) -> Parsed:
        """The reply ended: release everything held back."""


class HermesParser(ToolCallParser):
    """`<tool_call>{json}</tool_call>` blocks among content. The last block may lack its closing tag (the
    reply ended there). Whitespace next to a call is dropped; a block whose JSON is not a call stays content."""

    START, END = "<tool_call>", "</tool_call>"
    ARGUMENT_KEYS = ("arguments", "parameters")

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False
        self._after_call = False  # skip the whitespace that follows a call
        self._called = False

    def feed(self, text: str) -> Parsed:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> Parsed:
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> Parsed:
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._inside:
                end = self._buffer.find(self.END)
                if end < 0 and not final:
                    break
                body = self._buffer if end < 0 else self._buffer[:end]
                self._buffer = "" if end < 0 else self._buffer[end + len(self.END):]
                self._inside = False
                call = call_from_json(body, self.ARGUMENT_KEYS)
                if call is None:  # not a call: the block is content, as the model wrote it
                    content.append(self.START + body + ("" if end < 0 else self.END))
                else:
                    calls.append(call)
                    self._called = self._after_call = True
                continue
            if self._after_call:
                self._buffer = self._buffer.lstrip()
                if not self._buffer and not final:
                    break
                self._after_call = False
            start = self._buffer.find(self.START)
            if start >= 0:
                content.append(self._buffer[:start].rstrip())
                self._buffer = self._buffer[start + len(self.START):]
                self._inside = True
                continue
            if final:
                content.append(self._buffer.rstrip() if self._called else self._buffer)
                self._buffer = ""
                break
            # Hold a possible start tag, and trailing whitespace (dropped if a call follows it).
            held = _held_length(self._buffer, self.START)
            ready = self._buffer[:len(self._buffer) - held]
            keep = len(ready.rstrip())
            content.append(ready[:keep])
            self._buffer = self._buffer[keep:]
            break
        return Parsed("".join(content), tuple(calls))


class Llama3JsonParser(ToolCallParser):
    """A reply that starts with `{` (or `<|python_tag|>`) is a sequence of JSON calls separated by `;`; it
    is held to the end and becomes calls only if all of it parses. Any other reply is content."""

    PYTHON_TAG = "<|python_tag|>"
    ARGUMENT_KEYS = ("parameters", "arguments")

    def __init__(self) -> None:
        self._buffer = ""
        self._mode: str | None = None  # None: undecided; "content"; "calls"

    def feed(self, text: str) -> Parsed:
        if self._mode == "content":
            return Parsed(text)
        self._buffer += text
        if self._mode is None:
            head = self._buffer.lstrip()
            if head.startswith("{") or head.startswith(self.PYTHON_TAG):
                self._mode = "calls"
            elif head and not self.PYTHON_TAG.startswith(head):
                self._mode = "content"
                text, self._buffer = self._buffer, ""
                return Parsed(text)
        return Parsed()

    def finish(self) -> Parsed:
        text, self._buffer = self._buffer, ""
        if self._mode == "calls":
            calls = self._calls(text)
            if calls:
                return Parsed("", calls)
        return Parsed(text)

    def _calls(self, text: str) -> tuple[ToolCall, ...]:
        text = text.strip()
        if text.startswith(self.PYTHON_TAG):
            text = text[len(self.PYTHON_TAG):]
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        at = 0
        while True:
            while at < len(text) and (text[at].isspace() or (calls and text[at] == ";")):
                at += 1
            if at == len(text):
                return tuple(calls)
            try:
                value, at = decoder.raw_decode(text, at)
            except ValueError:
                return ()
            call = _call_from_object(value, self.ARGUMENT_KEYS)
            if call is None:
                return ()
            calls.append(call)


@dataclass(frozen=True)
class ToolFormat:
    """A model family's tool-call format: its parser, and the key its calls put the arguments under (a forced
    call's grammar is built from it: server/api/structured.py)."""

    name: str
    parser: Callable[[], ToolCallParser]
    argument_key: str


HERMES = ToolFormat("hermes", HermesParser, "arguments")
LLAMA3_JSON = ToolFormat("llama3_json", Llama3JsonParser, "parameters")


def tool_format_for_template(template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches its model, or None if it has no tool support."""
    if not template:
        return None
    if HermesParser.START in template:
        return HERMES
    if Llama3JsonParser.PYTHON_TAG in template or ('"parameters"' in template and "<|start_header_id|>" in template):
        return LLAMA3_JSON
    return None
