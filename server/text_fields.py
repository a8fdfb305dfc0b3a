"""Finding text a request cannot mean: lone UTF-16 surrogates.

JSON allows an unpaired `\\ud800` escape and Python's json module decodes it into a str that is not valid
Unicode: the tokenizer rejects it (TypeError), encoding it to UTF-8 fails (UnicodeEncodeError). So every
string in a validated request, dictionary keys included, is checked before anything else touches it, and
the first bad one is named in a 400.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def invalid_text_field(value: Any, path: str = "") -> str | None:
    """The name (e.g. `messages[0].content`) of the first string in `value` holding a lone surrogate; None if
    all text is valid. `path` is the name of `value` itself ("" for a whole request)."""
    if isinstance(value, str):
        return (path or "body") if _LONE_SURROGATE.search(value) else None
    if isinstance(value, BaseModel):
        fields = {name: getattr(value, name) for name in type(value).model_fields}
        return _first_in_mapping({**fields, **(value.model_extra or {})}, path)
    if isinstance(value, dict):
        return _first_in_mapping(value, path)
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = invalid_text_field(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _first_in_mapping(mapping: dict[Any, Any], path: str) -> str | None:
    for key, item in mapping.items():
        if isinstance(key, str) and _LONE_SURROGATE.search(key):
            return path or "body"  # the key itself cannot be named: name what holds it
        found = invalid_text_field(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None
