"""`subspec serve`: resolve the configs, load the tokenizer, start the worker process, run uvicorn.

    subspec serve                                  # the default model, config defaults
    subspec serve --config configs/X.yaml --port 8000 --api-key KEY --max-queue 16 --request-timeout 300

Engine settings: defaults < YAML < SUBSPEC_* env < flags (subspec_core.config.resolve_engine_config).
Server settings: defaults < YAML `server:` < SUBSPEC_SERVER_* env < flags (server.settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from server.engine_args import add_engine_arguments, engine_config_from_args, yaml_from_args
from server.worker.client import ModelInfo
from server.settings import (API_KEY_ENV, ServerSettings, add_settings_arguments, default_body_limit,
                             resolve_server_settings, settings_overrides)
from subspec_core.config import config_as_dict

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("server.serve")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """All `subspec serve` flags: --config, the engine's and the server's."""
    add_engine_arguments(parser)
    add_settings_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted. Returns the process exit code (1 if the engine could not start)."""
    import uvicorn

    from server.app import create_app
    from server.worker.process import ProcessEngineClient
    from server.edge.shutdown import DrainingServer
    from server.worker.main import load_engine

    try:
        yaml_data = yaml_from_args(args)
        engine_config = engine_config_from_args(args, yaml_data=yaml_data)
        settings = resolve_server_settings(yaml_section=yaml_data.get("server"), environ=os.environ,
                                           cli_overrides=settings_overrides(args))
    except (OSError, ValueError) as exc:
        print(f"subspec serve: {exc}", file=sys.stderr)
        return 2
    if settings.max_body_bytes is None:
        settings = dataclasses.replace(settings, max_body_bytes=default_body_limit(engine_config.max_model_len))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "server_api_key", None) is not None:
        logger.warning("--api-key is visible to every user of this machine (ps, /proc); set %s instead",
                       API_KEY_ENV)
    logger.info("engine config: %s", json.dumps(config_as_dict(engine_config)))
    logger.info("server settings: %s", json.dumps(settings.redacted()))

    # The API process needs the tokenizer (chat template, prompt lengths) but never the weights, torch or CUDA.
    # It fetches the model first (the download, on a first start), so the worker finds it cached.
    from subspec_core.api_tokenizer import api_tokenizer
    from subspec_core.model_source import ModelSourceError, offline_hint, resolve_model
    from subspec_core.startup import StartupLog, quiet_third_party_warnings

    quiet_third_party_warnings()
    phases = StartupLog(emit=logger.info)
    try:
        with phases.phase("fetch") as phase:
            resolved = resolve_model(engine_config.model, engine_config.gguf_file, check_hub=True)
            phase.detail = resolved.describe()
        with phases.phase("tokenizer") as phase:
            tokenizer = api_tokenizer(engine_config, resolved)
            phase.detail = f"{len(tokenizer)} tokens, for chat templates and prompt lengths in the API process"
    except (OSError, ModelSourceError) as exc:  # a model that cannot be read: one line that says what to do
        lines = str(exc).strip().splitlines()
        # offline (as compose runs it), the line that says how to fill the cache, in Docker too
        print(f"subspec serve: {offline_hint(engine_config.model) or (lines[0] if lines else repr(exc))}",
              file=sys.stderr)
        return 1
    model_name = engine_config.served_model_name or resolved.display_name
    logger.info("serving model %r; the engine worker loads it next (its start-up lines are marked [worker])",
                model_name)

    failures: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(reason: str) -> None:
        failures.append(reason)
        logger.error("the engine worker cannot be started: %s; shutting down", reason)
        if server is not None:
            server.should_exit = True

    announced: list[bool] = []

    def on_ready(info: ModelInfo) -> None:
        if not announced:  # the first worker only; replacements are logged by the engine client
            announced.append(True)
            print(ready_message(settings.host, settings.port, model_name, phases.elapsed_s,
                                api_key=settings.api_key is not None), file=sys.stderr, flush=True)

    client = ProcessEngineClient(functools.partial(load_engine, engine_config), log_level=settings.log_level,
                                 max_start_failures=settings.max_worker_start_failures,
                                 abort_timeout_s=settings.abort_timeout_s,
                                 heartbeat_timeout_s=settings.heartbeat_timeout_s, on_fatal=on_fatal)
    client.on_worker_ready(on_ready)
    app = create_app(settings=settings, engine_client=client, tokenizer=tokenizer, model_name=model_name)
    server = DrainingServer(uvicorn_config(app, settings), shutdown=app.state.shutdown)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    return 1 if failures else 0


def uvicorn_config(app: object, settings: ServerSettings) -> uvicorn.Config:
    """How uvicorn serves the app: h11 with deadlines for request heads and for clients that stop reading,
    idle keep-alive connections closed after 5 s, a short grace period after the app's own drain, and the
    app's own access log instead of uvicorn's (which prints query strings)."""
    import uvicorn

    from server.edge.protocol import timed_h11

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          http=timed_h11(settings.read_timeout_s, settings.write_timeout_s), timeout_keep_alive=5,
                          timeout_graceful_shutdown=5, access_log=False)


def callable_url(host: str, port: int) -> str:
    """The base URL a local client can call: a wildcard bind address is reached through loopback."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


def ready_message(host: str, port: int, model_name: str, elapsed_s: float, *, api_key: bool) -> str:
    """The line printed once the first engine worker is ready: where to send requests, and one to try."""
    base = callable_url(host, port)
    auth = ' -H "Authorization: Bearer $YOUR_KEY"' if api_key else ""
    body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    return (f"SubSpec Server ready in {elapsed_s:.1f} s: {model_name} at {base}/v1 (OpenAI-compatible). Try:\n"
            f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'")


def main(argv: list[str] | None = None) -> int:
    """`subspec serve` as a standalone entry point (also `python -m server.serve`)."""
    parser = argparse.ArgumentParser(prog="subspec serve", description="Run the OpenAI-compatible server.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":  # the guard matters: spawned workers import the main module as __mp_main__
    raise SystemExit(main())
