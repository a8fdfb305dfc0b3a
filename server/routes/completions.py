"""POST /v1/completions."""

from fastapi import APIRouter, Request, Response

from server.schemas import CompletionRequest, CompletionResponse, ErrorResponse

router = APIRouter()

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500, 503, 504)}


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS,
             summary="Text completion (set stream=true for server-sent events)")
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.completions.create(request, raw_request)
