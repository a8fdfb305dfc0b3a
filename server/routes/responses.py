"""POST /v1/responses (OpenAI's Responses API, text only)."""

from fastapi import APIRouter, Request, Response

from server.openapi_doc import error_responses
from server.schemas_responses import ResponsesRequest

router = APIRouter()

# With stream=true the 200 is the Responses event stream: each event has an `event` field naming its type
# (response.created, response.output_text.delta, ..., response.completed) and a `data` field holding the
# event object as JSON. (Before OpenAPI 3.2 an event-stream schema describes one event.)
STREAM_RESPONSE = {
    "description": "The response object, or with stream=true the Responses API's server-sent events",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["event", "data"],
        "properties": {"event": {"type": "string", "description": "The event's type, as in its data"},
                       "data": {"type": "string", "description": "The event object (JSON)"}},
    }}},
}


@router.post("/v1/responses",
             responses={200: STREAM_RESPONSE, **error_responses(400, 401, 404, 408, 413, 429, 500, 503, 504)},
             summary="Create a model response (set stream=true for the Responses event stream)")
async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.responses.create(request, raw_request)
