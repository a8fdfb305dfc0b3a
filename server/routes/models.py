"""GET /v1/models and /v1/models/{model}: the one served model."""

from fastapi import APIRouter, Request

from server.errors import APIError
from server.openapi_doc import error_responses
from server.schemas import ModelCard, ModelList

router = APIRouter()


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
