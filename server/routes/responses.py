"""POST /v1/responses (OpenAI's Responses API, text only)."""

from fastapi import APIRouter, Request, Response

from server.schemas import ErrorResponse
from server.schemas_responses import ResponsesRequest

router = APIRouter()

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500, 503, 504)}


@router.post("/v1/responses", responses=_ERRORS,
             summary="Create a model response (set stream=true for the Responses event stream)")
async def create_response(request: ResponsesRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.responses.create(request, raw_request)
