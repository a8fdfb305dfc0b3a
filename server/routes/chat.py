"""POST /v1/chat/completions."""

from fastapi import APIRouter, Request, Response

from server.schemas import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse

router = APIRouter()

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500, 503, 504)}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS,
             summary="Chat completion (set stream=true for server-sent events)")
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.chat.create(request, raw_request)
