"""HTTP routes: thin functions that let FastAPI validate the body (schemas) and call a handler on `app.state`.

/v1/chat/completions, /v1/completions and /v1/responses hand the request to their endpoint
(server/api/endpoint.py); /v1/models, /health and /metrics answer from state the app already holds.
"""

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from server.api.errors import APIError
from server.api.openapi import error_responses
from server.api.schemas import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                                ModelCard, ModelList)
from server.api.schemas_responses import ResponsesRequest

router = APIRouter()

_GENERATION_ERRORS = error_responses(400, 401, 404, 408, 413, 429, 500, 503, 504)

# With stream=true the 200 is a server-sent event stream. Before OpenAPI 3.2 (`itemSchema`), the `schema` of
# an event-stream media type describes one event: here a `data` field holding a chunk object as JSON, an
# `{"error": ...}` object as JSON, or the final `[DONE]`.
STREAM_RESPONSE = {
    "description": "The completion, or with stream=true a server-sent event stream of chunks ending with "
                   "`data: [DONE]`",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": "A chunk (JSON), an error object (JSON), "
                                                                 "or `[DONE]`"}},
    }}},
}
# The Responses event stream: each event has an `event` field naming its type (response.created,
# response.output_text.delta, ..., response.completed) and a `data` field holding the event object as JSON.
RESPONSES_STREAM = {
    "description": "The response object, or with stream=true the Responses API's server-sent events",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["event", "data"],
        "properties": {"event": {"type": "string", "description": "The event's type, as in its data"},
                       "data": {"type": "string", "description": "The event object (JSON)"}},
    }}},
}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={200: STREAM_RESPONSE, **_GENERATION_ERRORS},
             summary="Chat completion (set stream=true for server-sent events)")
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.chat.create(request, raw_request)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={200: STREAM_RESPONSE, **_GENERATION_ERRORS},
             summary="Text completion (set stream=true for server-sent events)")
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.completions.create(request, raw_request)


@router.post("/v1/responses", responses={200: RESPONSES_STREAM, **_GENERATION_ERRORS},
             summary="Create a model response (set stream=true for the Responses event stream)")
async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.responses.create(request, raw_request)


def _card(request: Request) -> ModelCard:
    state = request.app.state
    info = state.engine_client.model_info
    return ModelCard(id=state.model_name, created=state.started_at,
                     max_model_len=None if info is None else info.max_model_len)


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request)])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=error_responses(401, 404))
async def retrieve_model(model: str, request: Request) -> ModelCard:
    if model != request.app.state.model_name:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    return _card(request)


class HealthStatus(BaseModel):
    status: str = Field(description="`ok`, or why not: `loading`, `restarting`, `stalled`, `draining`, `failed`")
    model: str
    worker_pid: int | None = None
    worker_restarts: int = 0
    queue_depth: int = 0
    running: int = 0
    max_num_seqs: int = Field(1, description="requests that run at once, as the ready worker reports it (the "
                                            "planner's choice under max_num_seqs auto)")
    last_error: str | None = None


@router.get("/health", response_model=HealthStatus,
            responses={503: {"model": HealthStatus, "description": "Not ready (see `status`); with Retry-After"}})
async def health(request: Request) -> JSONResponse:
    """200 only while an engine worker is ready and making progress and the server is not draining; 503
    otherwise. Cheap: it reads state, never queues a generation."""
    state = request.app.state
    status = state.engine_client.status()
    if state.shutdown.draining:
        word = "draining"
    else:
        word = "ok" if status.get("state") == "ready" else status.get("state", "loading")
    body = {
        "status": word,
        "model": state.model_name,
        "worker_pid": status.get("worker_pid"),
        "worker_restarts": status.get("worker_restarts", 0),
        "queue_depth": state.admission.waiting,
        "running": state.admission.running,
        "max_num_seqs": state.admission.slots,
        "last_error": status.get("last_error"),
    }
    if word == "ok":
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)",
            responses={200: {"description": "Metrics prefixed `subspec_`",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
