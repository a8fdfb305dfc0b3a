"""What a request body may look like before the server works on it, and what it may make the server keep.

- Shape (`json_shape_error`, on the raw body before FastAPI parses it): at most `MAX_DEPTH` levels of
  nesting, `MAX_FIELDS` members per object and `MAX_NAME_CHARS` characters per member name. Past them a
  request is a 400 naming the limit, so no handler ever recurses deep or walks a huge object, and nothing a
  client sends can end in a RecursionError (a 500 with a traceback per request).
- Text (`invalid_text_field`): JSON allows an unpaired `\\ud800` escape, which Python decodes into a str
  that is not valid Unicode (the tokenizer raises TypeError, UTF-8 encoding fails). Every string of a
  validated request, names included, is checked before anything else touches it.
- Unknown fields (`IgnoredFields`): ignored, logged once per name and listed in a response header, each
  name cut to `MAX_SHOWN_NAME_CHARS` and the header to `MAX_HEADER_NAMES` names and `MAX_HEADER_CHARS`, so a client inventing names
  grows neither memory, the log, nor a header past what clients can read.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from pydantic import BaseModel

from server.api.errors import APIError

logger = logging.getLogger(__name__)

MAX_DEPTH = 64
MAX_FIELDS = 1024
MAX_NAME_CHARS = 256
MAX_SHOWN_NAME_CHARS = 64
MAX_HEADER_CHARS = 1024
MAX_HEADER_NAMES = 32
_REMEMBERED_NAMES = 1024  # distinct unknown names logged per server

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_shape_error(body: bytes) -> APIError | None:
    """The 400 for a JSON body past the shape limits; None when within them or not JSON at all (the
    request's validation reports that)."""
    try:
        value = json.loads(body)
    except RecursionError:  # the C decoder stops at Python's recursion limit, far past MAX_DEPTH
        return _too_deep()
    except ValueError:
        return None
    pending: list[tuple[Any, int]] = [(value, 1)]  # iterative: no recursion, whatever the body
    while pending:
        item, depth = pending.pop()
        if depth > MAX_DEPTH:
            return _too_deep()
        if isinstance(item, dict):
            if len(item) > MAX_FIELDS:
                return APIError(400, f"a JSON object in the request body has {len(item)} members; at most "
                                     f"{MAX_FIELDS} are accepted", code="too_many_fields")
            for name, child in item.items():
                if len(name) > MAX_NAME_CHARS:
                    return APIError(400, f"a member name in the request body is {len(name)} characters long; at "
                                         f"most {MAX_NAME_CHARS} are accepted", code="field_name_too_long")
                if isinstance(child, (dict, list)):
                    pending.append((child, depth + 1))
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return None


def _too_deep() -> APIError:
    return APIError(400, f"the request body nests JSON more than {MAX_DEPTH} levels deep", code="json_too_deep")


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


def shown_name(name: str) -> str:
    """A client's field name as the server may log or echo it: printable ASCII (escaped, so no header
    injection and nothing Latin-1 cannot encode), at most MAX_SHOWN_NAME_CHARS characters."""
    escaped = name.encode("unicode_escape").decode("ascii")
    if len(escaped) <= MAX_SHOWN_NAME_CHARS:
        return escaped
    return escaped[: MAX_SHOWN_NAME_CHARS - 3] + "..."


class IgnoredFields:
    """Unknown request fields: logged once per (shortened) name, listed in `X-SubSpec-Ignored-Fields`."""

    header = "X-SubSpec-Ignored-Fields"

    def __init__(self) -> None:
        self._logged: set[str] = set()

    def note(self, names: list[str]) -> dict[str, str]:
        """Log names not seen before; the response header that lists them (empty when there are none)."""
        if not names:
            return {}
        shown = [shown_name(name) for name in names]
        for name in shown:
            if name not in self._logged and len(self._logged) < _REMEMBERED_NAMES:
                self._logged.add(name)
                logger.warning("ignoring unknown request field %r (logged once per field name)", name)
        listed: list[str] = []
        length = 0
        for name in shown[:MAX_HEADER_NAMES]:
            if length + len(name) + 2 > MAX_HEADER_CHARS - 20:  # room left for the "... (N more)" tail
                break
            listed.append(name)
            length += len(name) + 2
        if len(listed) < len(shown):
            listed.append(f"... ({len(shown) - len(listed)} more)")
        return {self.header: ", ".join(listed)}
