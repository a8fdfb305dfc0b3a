"""GET /health: 200 only while the server is live, an engine worker is ready and the server is not
draining; 503 otherwise. Cheap: it reads state, never queues a generation."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

router = APIRouter()


class HealthStatus(BaseModel):
    status: str = Field(description="`ok`, or why not: `loading`, `restarting`, `stalled`, `draining`, `failed`")
    model: str
    worker_pid: int | None = None
    worker_restarts: int = 0
    queue_depth: int = 0
    running: int = 0
    last_error: str | None = None


@router.get("/health", response_model=HealthStatus,
            responses={503: {"model": HealthStatus, "description": "Not ready (see `status`)"}})
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    client = state.engine_client
    status = client.status()
    draining = state.shutdown.draining
    ready = client.is_ready() and not draining
    body = {
        "status": "ok" if ready else ("draining" if draining else status.get("state", "loading")),
        "model": state.model_name,
        "worker_pid": status.get("worker_pid"),
        "worker_restarts": status.get("worker_restarts", 0),
        "queue_depth": state.admission.waiting,
        "running": state.admission.running,
        "last_error": status.get("last_error"),
    }
    return JSONResponse(body, status_code=200 if ready else 503)
