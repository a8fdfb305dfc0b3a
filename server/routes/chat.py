"""POST /v1/chat/completions."""

from fastapi import APIRouter, Request, Response

from server.openapi_doc import error_responses
from server.routes.completions import STREAM_RESPONSE
from server.schemas import ChatCompletionRequest, ChatCompletionResponse

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={200: STREAM_RESPONSE, **error_responses(400, 401, 404, 408, 413, 429, 500, 503, 504)},
             summary="Chat completion (set stream=true for server-sent events)")
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    return await raw_request.app.state.chat.create(request, raw_request)
