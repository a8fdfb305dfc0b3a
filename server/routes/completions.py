"""POST /v1/completions."""

from fastapi import APIRouter, Request, Response

from server.openapi_doc import error_responses
from server.schemas import CompletionRequest, CompletionResponse

router = APIRouter()

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


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={200: STREAM_RESPONSE, **error_responses(400, 401, 404, 408, 413, 429, 500, 503, 504)},
             summary="Text completion (set stream=true for server-sent events)")
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.completions.create(request, raw_request)
