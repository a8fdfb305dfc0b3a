"""`create_app()`: build one server instance. Everything it needs is passed in and hung on `app.state`;
nothing is global, so tests can run several apps (each with its own metrics registry) in one process."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI

from server.admission import Admission
from server.auth import APIKeyMiddleware
from server.body_limit import BodyLimitMiddleware
from server.engine_client import EngineClient
from server.errors import APIError, install_error_handlers
from server.logprobs import TokenStrings
from server.openapi_doc import openapi_document
from server.prompting import PromptBuilder
from server.request_id import RequestIdMiddleware
from server.routes import chat, completions, health, metrics, models, responses
from server.serving import GenerationService
from server.serving_chat import ChatEndpoint
from server.serving_completion import CompletionEndpoint
from server.serving_responses import ResponsesEndpoint
from server.settings import MIB, ServerSettings
from server.shutdown import GracefulShutdown
from server.telemetry import ResponseCounter, ServerMetrics

_COMPLETION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_ENDPOINTS = (*_COMPLETION_ENDPOINTS, "/v1/models", "/health", "/metrics")


def endpoint_label(path: str) -> str:
    """A bounded metrics label for a request path (unknown paths share one label)."""
    for endpoint in _ENDPOINTS:
        if path == endpoint or path.startswith(endpoint + "/"):
            return endpoint
    return "other"


def _counted_by_middleware(path: str) -> str | None:
    label = endpoint_label(path)
    return None if label in _COMPLETION_ENDPOINTS else label


def create_app(*, settings: ServerSettings, engine_client: EngineClient, tokenizer: Any, model_name: str,
               server_metrics: ServerMetrics | None = None) -> FastAPI:
    """An OpenAI-compatible app serving `model_name` through `engine_client`.

    `tokenizer` is the model's tokenizer (no weights): chat template (or `settings.chat_template`'s) and
    prompt lengths are handled here, before a request is queued. The app starts the engine client on startup
    and closes it on shutdown; `app.state.shutdown` drains it gracefully first (see
    server.shutdown.DrainingServer). Bodies are limited to `settings.max_body_bytes` (1 MiB when unset;
    `subspec serve` sizes it from max_model_len).
    """
    server_metrics = server_metrics if server_metrics is not None else ServerMetrics()
    admission = Admission(settings.max_queue)
    server_metrics.bind(waiting=lambda: admission.waiting, running=lambda: admission.running,
                        engine_status=engine_client.status, model_name=model_name)
    service = GenerationService(client=engine_client, admission=admission, metrics=server_metrics,
                                settings=settings, model_name=model_name)
    chat_template = None if settings.chat_template is None else Path(settings.chat_template).read_text()
    prompts = PromptBuilder(tokenizer, chat_template)
    strings = TokenStrings(tokenizer)
    shutdown = GracefulShutdown(admission=admission, service=service, timeout_s=settings.shutdown_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine_client.start()
        try:
            yield
        finally:
            await engine_client.close()
            service.close()

    app = FastAPI(title="SubSpec Server", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible inference for models larger than GPU memory "
                              "(streamed weight offload + lossless substitute speculative decoding).")
    app.state.settings = settings
    app.state.engine_client = engine_client
    app.state.metrics = server_metrics
    app.state.admission = admission
    app.state.model_name = model_name
    app.state.started_at = int(time.time())
    app.state.chat = ChatEndpoint(service, prompts, strings)
    app.state.completions = CompletionEndpoint(service, prompts, strings)
    app.state.shutdown = shutdown
    app.state.responses = ResponsesEndpoint(service, prompts)

    def count_rejected(path: str, error: APIError) -> None:
        """Completion requests rejected before their route ran (validation, key); others are counted by
        the ResponseCounter middleware."""
        if _counted_by_middleware(path) is None:
            server_metrics.count(endpoint_label(path), error.status_code)

    install_error_handlers(app, lambda request, error: count_rejected(request.url.path, error))
    # Middleware added last runs first: count every response, then check the key (before reading any of
    # the body), then read the body within its size and time limits.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes or MIB,
                       read_timeout_s=settings.read_timeout_s, on_reject=count_rejected)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key, on_reject=count_rejected)
    app.add_middleware(ResponseCounter, metrics=server_metrics, label=_counted_by_middleware)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response, rejections included, gets the id
    for module in (chat, completions, responses, models, health, metrics):
        app.include_router(module.router)
    app.openapi = lambda: openapi_document(  # type: ignore[method-assign]
        app, bearer_auth=settings.api_key is not None, vocab_size=len(tokenizer))
    return app
