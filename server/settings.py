"""Server settings (the HTTP side; the engine's are `subspec_core.config.EngineConfig`).

One frozen dataclass, validated once. Precedence, lowest first: defaults < the YAML's `server:` section <
SUBSPEC_SERVER_<FIELD> environment variables < CLI flags, the engine's rule (`subspec_core.config.merge_sources`).
The CLI flags are derived from the fields (`add_settings_arguments`), so the dataclass is the one place a
setting is declared.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from subspec_core.config import check_keys, environment_values, merge_sources

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
MIB = 1 << 20
# The API key may also come from SUBSPEC_API_KEY (as vLLM reads VLLM_API_KEY): an environment variable
# does not show in `ps` the way a command-line flag does.
API_KEY_ENV = "SUBSPEC_API_KEY"


def default_body_limit(max_model_len: int) -> int:
    """Largest request body accepted when `max_body_bytes` is not set: 32 bytes per context token (a
    token is 3-8 bytes of JSON text or ids, 6 per character in \\u escapes), at least 1 MiB, at most 4 MiB."""
    return min(max(32 * max_model_len, 1 * MIB), 4 * MIB)


def _setting(default: Any, help: str, *flags: str, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "flags": flags, "metavar": metavar})


@dataclass(frozen=True)
class ServerSettings:
    """How the HTTP server listens, admits and times out requests."""

    host: str = _setting("127.0.0.1", "interface to listen on (0.0.0.0: all)")
    port: int = _setting(8000, "TCP port")
    api_key: str | None = _setting(None, "require 'Authorization: Bearer KEY' on /v1 endpoints", metavar="KEY")
    max_queue: int = _setting(64, "requests that may wait behind the running one(s) (max_num_seqs run at once); "
                                  "more get 429", metavar="N")
    request_timeout_s: float | None = _setting(
        None, "deadline per request in seconds, from arrival to its last byte sent, queue time included "
              "(none: no deadline)", "--request-timeout",
        metavar="S")
    abort_timeout_s: float = _setting(
        300.0, "kill and restart the worker if it has not stopped an aborted request after this many seconds "
               "(a last resort against a hung engine step)",
        "--abort-timeout", metavar="S")
    heartbeat_timeout_s: float = _setting(
        60.0, "while a request runs, a worker that reports no progress for this many seconds is declared "
              "hung: /health turns 503, the worker is killed and replaced (queued requests wait for it)",
        "--heartbeat-timeout", metavar="S")
    max_worker_start_failures: int = _setting(
        3, "consecutive failed worker restarts before the server gives up", metavar="N")
    max_body_bytes: int | None = _setting(
        None, "largest request body in bytes; larger ones get 413 before they are read (none: 32 bytes per "
              "token of max_model_len, between 1 and 4 MiB)", metavar="N")
    read_timeout_s: float = _setting(
        30.0, "a client must send a request's headers, and then its body, within this many seconds each, or "
              "the connection is closed (408 for a body)", "--read-timeout", metavar="S")
    write_timeout_s: float = _setting(
        30.0, "a client must accept bytes of its response within this many seconds whenever the server has "
              "more to send, or the connection is closed (a stream is then stopped and counted as 499)",
        "--write-timeout", metavar="S")
    max_stream_buffer_bytes: int = _setting(
        4 * MIB, "event-stream bytes a request may have made but not yet sent; a client reading slower than "
                 "this lets the engine run ahead gets its stream stopped with an error event", metavar="N")
    shutdown_timeout_s: float = _setting(
        30.0, "on SIGTERM/SIGINT: new requests get 503, queued ones end at once with an error, the running ones "
              "may finish for this many seconds before they are ended with an error event",
        "--shutdown-timeout", metavar="S")
    log_level: str = _setting("info", f"one of {', '.join(LOG_LEVELS)}")
    chat_template: str | None = _setting(
        None, "a Jinja chat template file used instead of the tokenizer's (e.g. one that renders tools)",
        metavar="FILE")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"server.port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("server.api_key must not be empty (leave it unset to disable authentication)")
        if self.max_queue < 0:
            raise ValueError("server.max_queue must be >= 0")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError("server.request_timeout_s must be > 0 (or unset for no deadline)")
        if self.abort_timeout_s <= 0:
            raise ValueError("server.abort_timeout_s must be > 0")
        if self.heartbeat_timeout_s <= 0:
            raise ValueError("server.heartbeat_timeout_s must be > 0")
        if self.max_body_bytes is not None and self.max_body_bytes < 1024:
            raise ValueError("server.max_body_bytes must be >= 1024 (or unset for the default)")
        if self.read_timeout_s <= 0:
            raise ValueError("server.read_timeout_s must be > 0")
        if self.write_timeout_s <= 0:
            raise ValueError("server.write_timeout_s must be > 0")
        if self.max_stream_buffer_bytes < 1024:
            raise ValueError("server.max_stream_buffer_bytes must be >= 1024")
        if self.shutdown_timeout_s < 0:
            raise ValueError("server.shutdown_timeout_s must be >= 0")
        if self.max_worker_start_failures < 1:
            raise ValueError("server.max_worker_start_failures must be >= 1")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"server.log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"server.chat_template: no such file: {self.chat_template}")

    def redacted(self) -> dict[str, Any]:
        """Plain-data view for logging, without the secret."""
        data = dataclasses.asdict(self)
        if data["api_key"] is not None:
            data["api_key"] = "***"
        return data


_FIELDS = {f.name: f for f in dataclasses.fields(ServerSettings)}
_NONE_WORDS = {"", "none", "null"}


def _field_type(name: str) -> type:
    """int, float or str: the non-None type of a field's annotation."""
    annotation = str(_FIELDS[name].type)
    for kind in (int, float, str):
        if annotation.split(" |")[0] == kind.__name__:
            return kind
    raise TypeError(f"unsupported setting type {annotation} for {name}")


def _optional(name: str) -> bool:
    return "None" in str(_FIELDS[name].type)


def _coerce(name: str, value: Any) -> Any:
    """Parse a setting given as text (environment) or plain YAML data into the field's type."""
    kind = _field_type(name)
    # Empty means unset (as an empty variable from compose does); 'none'/'null' too, except for strings.
    unset_words = {""} if kind is str else _NONE_WORDS
    if value is None or (isinstance(value, str) and value.strip().lower() in unset_words):
        if not _optional(name):
            raise ValueError(f"server.{name} cannot be empty")
        return None
    if kind is str:
        return str(value)
    if isinstance(value, bool) or (kind is int and isinstance(value, float)):
        raise ValueError(f"server.{name} must be {kind.__name__}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"server.{name} must be {kind.__name__}, got {value!r}") from None


def _coerced(data: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _coerce(name, value) for name, value in data.items()}


def resolve_server_settings(*, yaml_section: Mapping[str, Any] | None = None,
                            environ: Mapping[str, str] | None = None,
                            cli_overrides: Mapping[str, Any] | None = None) -> ServerSettings:
    """Merge defaults < YAML `server:` section < SUBSPEC_SERVER_* env < CLI into one ServerSettings
    (subspec_core.config.merge_sources: the engine's precedence).

    CLI overrides whose value is None mean 'not given'. The API key is also read from SUBSPEC_API_KEY.
    """
    yaml_data, flags, environ = yaml_section or {}, cli_overrides or {}, environ or {}
    check_keys(yaml_data, _FIELDS, "the server: section")
    check_keys(flags, _FIELDS, "CLI overrides")
    env = environment_values(environ, "SUBSPEC_SERVER_", _FIELDS)
    if "api_key" not in env and environ.get(API_KEY_ENV, "") != "":
        env["api_key"] = environ[API_KEY_ENV]
    given = {name: value for name, value in flags.items() if value is not None}
    return ServerSettings(**merge_sources(yaml_data=_coerced(yaml_data), env=_coerced(env), flags=_coerced(given)))


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerSettings field: `--max-queue`, `--api-key`, ... (defaults shown are the
    dataclass's; a flag left out does not override the YAML or the environment)."""
    group = parser.add_argument_group("server", "HTTP server settings (YAML 'server:' section, env SUBSPEC_SERVER_*)")
    for name, f in _FIELDS.items():
        flags = list(f.metadata["flags"]) or [f"--{name.replace('_', '-')}"]
        default_text = "none" if f.default is None else f.default
        group.add_argument(*flags, dest=f"server_{name}", type=_field_type(name), default=None,
                           metavar=f.metadata["metavar"] or name.upper(),
                           help=f"{f.metadata['help']} (default: {default_text})")


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The server flags given on the command line, as resolve_server_settings' cli_overrides."""
    return {name: getattr(args, f"server_{name}", None) for name in _FIELDS}
