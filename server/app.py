"""`create_app()`: build one server instance. Everything it needs is passed in and hung on `app.state`;
nothing is global, so tests can run several apps (each with its own metrics registry) in one process.

The server has three rooms, and a request crosses each once:
- server/edge/: the HTTP edge (request id, access log, API key, body limits and framing, the h11 protocol's
  deadlines, graceful shutdown);
- server/api/: the OpenAI API (schemas, routes, the request flow of every endpoint, prompts, tool calls,
  logprobs, SSE, the OpenAPI document);
- server/worker/: the engine side (admission, the job runner, the engine client and its worker process,
  IPC, the engine loop, telemetry).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI

from server.api.chat import ChatEndpoint
from server.api.completions import CompletionEndpoint
from server.api.endpoint import ServingContext
from server.api.errors import APIError, install_error_handlers
from server.api.input_limits import IgnoredFields
from server.api.logprobs import TokenStrings
from server.api.openapi import openapi_document
from server.api.prompting import PromptBuilder, PromptPool
from server.api.responses import ResponsesEndpoint
from server.api.routes import router
from server.edge.access_log import AccessLogMiddleware
from server.edge.auth import APIKeyMiddleware
from server.edge.body_limit import BodyLimitMiddleware
from server.edge.request_id import RequestIdMiddleware
from server.edge.shutdown import GracefulShutdown
from server.settings import MIB, ServerSettings
from server.worker.admission import Admission
from server.worker.client import EngineClient
from server.worker.runner import JobRunner
from server.worker.telemetry import ResponseCounter, ServerMetrics

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
    server.edge.shutdown.DrainingServer). Bodies are limited to `settings.max_body_bytes` (1 MiB when unset;
    `subspec serve` sizes it from max_model_len). As many requests run on the engine at once as its worker
    reports in Ready (max_num_seqs, the planner's choice when auto; one until a worker is ready); the rest wait
    in the queue.
    """
    server_metrics = server_metrics if server_metrics is not None else ServerMetrics()
    admission = Admission(settings.max_queue)
    engine_client.on_worker_ready(lambda info: admission.resize(info.max_num_seqs))
    server_metrics.bind(waiting=lambda: admission.waiting, running=lambda: admission.running,
                        engine_status=engine_client.status, model_name=model_name)
    engine_client.on_step(lambda step: server_metrics.observe_step(step.sequences, step.rows))
    runner = JobRunner(engine_client, request_timeout_s=settings.request_timeout_s)
    chat_template = None if settings.chat_template is None else Path(settings.chat_template).read_text()
    prompt_pool = PromptPool()
    context = ServingContext(
        client=engine_client, runner=runner, admission=admission, metrics=server_metrics,
        prompts=PromptBuilder(tokenizer, chat_template), prompt_pool=prompt_pool, strings=TokenStrings(tokenizer),
        ignored=IgnoredFields(), model_name=model_name, max_stream_buffer_bytes=settings.max_stream_buffer_bytes)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine_client.start()
        try:
            yield
        finally:
            await engine_client.close()
            prompt_pool.close()

    app = FastAPI(title="SubSpec Server", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible inference for models larger than GPU memory "
                              "(streamed weight offload + lossless substitute speculative decoding).")
    app.state.settings = settings
    app.state.engine_client = engine_client
    app.state.metrics = server_metrics
    app.state.admission = admission
    app.state.model_name = model_name
    app.state.started_at = int(time.time())
    app.state.chat = ChatEndpoint(context)
    app.state.completions = CompletionEndpoint(context)
    app.state.responses = ResponsesEndpoint(context)
    app.state.shutdown = GracefulShutdown(admission=admission, runner=runner, timeout_s=settings.shutdown_timeout_s)

    def count_rejected(path: str, error: APIError) -> None:
        """Completion requests rejected before their route ran (validation, key); others are counted by
        the ResponseCounter middleware."""
        if _counted_by_middleware(path) is None:
            server_metrics.count(endpoint_label(path), error.status_code)

    install_error_handlers(app, lambda request, error: count_rejected(request.url.path, error))
    # Middleware added last runs first: the id, then the access log, then count every response, then check the
    # key (before reading any of the body), then read the body within its size, time and shape limits.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes or MIB,
                       read_timeout_s=settings.read_timeout_s, on_reject=count_rejected)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key, on_reject=count_rejected)
    app.add_middleware(ResponseCounter, metrics=server_metrics, label=_counted_by_middleware)
    app.add_middleware(AccessLogMiddleware)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response, rejections included, gets the id
    app.include_router(router)
    app.openapi = lambda: openapi_document(  # type: ignore[method-assign]
        app, bearer_auth=settings.api_key is not None, vocab_size=len(tokenizer))
    return app
