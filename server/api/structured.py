"""Structured outputs: which constraint a request asks for, as a grammar the engine enforces (subspec_core/grammar.py).

A request names at most one of:
- `response_format` `{"type": "json_object"}` (any JSON object) or `{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}` (chat and text completions); the Responses API's `text.format` likewise;
- vLLM's `structured_outputs` `{"json" | "regex" | "choice" | "grammar": ...}` and its older `guided_json`,
  `guided_regex`, `guided_choice`, `guided_grammar`;
- in chat, `tool_choice` "required" or a named function with `tools`: the reply is one or more calls in the
  chat template's tool-call format whose arguments match the function's `parameters` schema (`auto` stays
  free text).
A second one, or one that does not compile, is a 400 naming the field, before the request is queued.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from server.api.errors import APIError, bad_request
from server.api.tool_calls import ToolFormat
from subspec_core.grammar import (Constraint, GrammarError, check, choice_constraint, json_schema_constraint,
                                  lark_constraint, regex_constraint)

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


def checked(*candidates: Constraint | None) -> Constraint | None:
    """The one constraint among `candidates`, compiled once to be sure it can be enforced (a 400 otherwise)."""
    constraint = _one([c for c in candidates if c is not None])
    if constraint is not None:
        try:
            check(constraint)
        except GrammarError as exc:
            raise _error(exc) from None
    return constraint


def _one(found: list[Constraint]) -> Constraint | None:
    if len(found) > 1:
        raise bad_request(f"only one structured output constraint may be given; this request sets "
                          f"{', '.join(c.origin for c in found)}", param=found[1].origin.split(".")[0],
                          code="invalid_value")
    return found[0] if found else None


def request_constraint(request: Any) -> Constraint | None:
    """The constraint of a chat, completion or Responses request (not counting tools), or None."""
    found: list[Constraint] = []
    try:
        _response_format(getattr(request, "response_format", None), "response_format", found)
        text = getattr(request, "text", None)
        if text is not None:
            _response_format(text.format, "text.format", found)
        _vllm_fields(request, found)
    except GrammarError as exc:
        raise _error(exc) from None
    return _one(found)


def _response_format(value: Any, origin: str, found: list[Constraint]) -> None:
    kind = None if value is None else getattr(value, "type", None)
    if kind == "json_object":
        found.append(json_schema_constraint(ANY_JSON_OBJECT, f"{origin}.type"))
    elif kind == "json_schema":
        # chat's nests the schema in `json_schema`; the Responses API's `text.format` holds it directly
        spec = getattr(value, "json_schema", None)
        if spec is None and origin == "text.format":
            spec, where = value.model_extra or {}, origin
        else:
            where = f"{origin}.json_schema"
        schema = (spec or {}).get("schema")
        if schema is None:
            raise GrammarError(f"{where}.schema", "a json_schema response format needs a `schema`")
        found.append(json_schema_constraint(schema, f"{where}.schema"))


def _vllm_fields(request: Any, found: list[Constraint]) -> None:
    structured = getattr(request, "structured_outputs", None)
    if isinstance(structured, dict):
        known = {k: v for k, v in structured.items() if v not in (None, False)}
        for key in known:
            if key not in ("json", "regex", "choice", "grammar", "json_object"):
                raise GrammarError(f"structured_outputs.{key}", "not supported (use json, regex, choice or grammar)")
        for key, value in known.items():
            found.append(_vllm_constraint(key, value, f"structured_outputs.{key}"))
    elif structured is not None:
        raise GrammarError("structured_outputs", "must be an object such as {\"json\": {...}}")
    for key in ("json", "regex", "choice", "grammar"):
        value = getattr(request, f"guided_{key}", None)
        if value is not None:
            found.append(_vllm_constraint(key, value, f"guided_{key}"))


def _vllm_constraint(kind: str, value: Any, origin: str) -> Constraint:
    if kind == "json_object":
        return json_schema_constraint(ANY_JSON_OBJECT, origin)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise GrammarError(origin, "not a JSON schema (it is a string that does not parse as JSON)") from None
        return json_schema_constraint(value, origin)
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise GrammarError(origin, "a regex must be a non-empty string")
        return regex_constraint(value, origin)
    if kind == "choice":
        if not isinstance(value, list):
            raise GrammarError(origin, "choices must be a list of strings")
        return choice_constraint(value, origin)
    if not isinstance(value, str) or not value.strip():
        raise GrammarError(origin, "a grammar must be a non-empty string (Lark, or GBNF with `root ::=`)")
    return lark_constraint(value, origin)


def tool_call_constraint(fmt: ToolFormat, tools: Sequence[Any], *, named: str | None,
                         parallel: bool) -> Constraint:
    """A reply that is tool calls in `fmt`: one call of `named`, or one or more (one when not `parallel`) of
    any of `tools`, each with arguments that match the function's `parameters` schema."""
    chosen = [tool for tool in tools if named is None or tool.function.name == named]
    calls = [{"type": "object", "properties": {
        "name": {"const": tool.function.name},
        fmt.argument_key: tool.function.parameters or {"type": "object"}},
        "required": ["name", fmt.argument_key], "additionalProperties": False} for tool in chosen]
    call_schema = json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls})
    more = parallel and named is None
    if fmt.name == "hermes":
        rules = ['start: call' + (' ("\\n" call)*' if more else ''),
                 'call: "<tool_call>\\n" body "\\n</tool_call>"']
    else:  # Llama 3.1 JSON: the whole reply is the call(s), separated by ";"
        rules = ['start: body' + (' (";" body)*' if more else '')]
    rules.append(f"body: %json {call_schema}")
    try:
        return lark_constraint("\n".join(rules), "tools" if named is None else "tool_choice")
    except GrammarError as exc:
        raise _error(exc) from None


def _error(exc: GrammarError) -> APIError:
    return bad_request(f"{exc.origin}: {exc.reason}", param=exc.origin, code="invalid_grammar")
