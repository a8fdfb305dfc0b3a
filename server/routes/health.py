"""GET /health: 200 only while the server is live and an engine worker is ready; 503 otherwise."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    client = state.engine_client
    status = client.status()
    ready = client.is_ready()
    body = {
        "status": "ok" if ready else status.get("state", "loading"),
        "model": state.model_name,
        "worker_pid": status.get("worker_pid"),
        "worker_restarts": status.get("worker_restarts", 0),
        "queue_depth": state.admission.waiting,
        "running": state.admission.running,
        "last_error": status.get("last_error"),
    }
    return JSONResponse(body, status_code=200 if ready else 503)
