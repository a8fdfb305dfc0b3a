"""The shared HTTP flow of the completion endpoints, and how their results are framed.

`OpenAIEndpoint.create` runs the checks, admits the request, then either streams SSE chunks or returns
one JSON body; subclasses (`serving_chat`, `serving_completion`) supply the prompt and the body shapes.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.admission import Ticket
from server.errors import APIError
from server.prompting import PromptBuilder
from server.request_id import request_id_of
from server.serving import ClientGone, Completion, GenerationService, Job, usage
from server.streaming import DONE_FRAME, SSEResponse, sse_frame
from server.telemetry import STATUS_CLIENT_CLOSED, RequestRecord


class OpenAIEndpoint(ABC):
    """One completion endpoint: the shared request flow, with endpoint-specific prompt and body shapes.

    Checks run in this order: model (404), unsupported parameters (400), worker ready (503), prompt and
    context window (400), queue (429). Nothing is queued until every check has passed.
    """

    endpoint: str  # metrics label, e.g. "/v1/chat/completions"
    id_prefix: str  # "chatcmpl" / "cmpl"
    chunk_object: str  # the `object` of streamed chunks

    def __init__(self, service: GenerationService, prompts: PromptBuilder) -> None:
        self.service = service
        self.prompts = prompts

    # -- endpoint specifics -----------------------------------------------------------------------------
    @abstractmethod
    def prompt_ids(self, request: Any) -> list[int]: ...

    @abstractmethod
    def max_tokens(self, request: Any) -> tuple[int | None, str]:
        """The requested max tokens (None: fill the context) and the name of the field it came from."""

    prompt_param: str

    @abstractmethod
    def opening_choice(self) -> dict[str, Any] | None:
        """The choice of a chunk sent before any text (chat: the role), or None."""

    @abstractmethod
    def text_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]: ...

    @abstractmethod
    def response_body(self, job: Job, created: int, result: Completion) -> dict[str, Any]: ...

    # -- shared flow ------------------------------------------------------------------------------------
    async def create(self, request: Any, raw_request: Request) -> Response:
        """Handle one request; never raises APIError (it becomes the response, and is counted)."""
        service = self.service
        record = service.metrics.start(self.endpoint)
        try:
            service.check_model(request.model)
            service.check_supported(request.unsupported_parameters())
            info = service.check_ready()
            prompt_ids = self.prompt_ids(request)
            max_tokens, max_tokens_param = self.max_tokens(request)
            sampling = service.sampling_params(request, prompt_len=len(prompt_ids), max_model_len=info.max_model_len,
                                               max_tokens=max_tokens, max_tokens_param=max_tokens_param,
                                               prompt_param=self.prompt_param)
            job = service.job(f"{self.id_prefix}-{uuid.uuid4().hex}", prompt_ids, sampling, record,
                              correlation_id=request_id_of(raw_request))
            ticket = service.admit(job.request_id)
        except APIError as exc:
            record.finish(exc.status_code)
            return exc.response(request_id_of(raw_request))
        created = int(time.time())
        if request.stream:
            def on_close() -> None:  # also covers a stream that never started (client gone first)
                ticket.release()
                record.finish(STATUS_CLIENT_CLOSED)

            body = self._stream(job, ticket, record, created, request.include_usage())
            return SSEResponse(body, on_close=on_close)
        try:
            result = await service.collect(job, ticket, record, raw_request)
        except APIError as exc:  # already counted by events()
            return exc.response(job.correlation_id)
        except ClientGone:
            return Response(status_code=STATUS_CLIENT_CLOSED)
        finally:
            ticket.release()
        return JSONResponse(self.response_body(job, created, result))

    def _chunk(self, job: Job, created: int, choice: dict[str, Any] | None, include_usage: bool,
               usage_value: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {"id": job.request_id, "object": self.chunk_object, "created": created,
                                   "model": self.service.model_name, "system_fingerprint": None,
                                   "choices": [] if choice is None else [choice]}
        if include_usage:
            payload["usage"] = usage_value
        return sse_frame(payload)

    async def _stream(self, job: Job, ticket: Ticket, record: RequestRecord, created: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
        """SSE frames: [opening chunk], one chunk per event with text, a finish chunk, [usage], [DONE].
        A failure mid-stream becomes an `{"error": ...}` event (the HTTP status is already 200)."""
        tokens = 0
        opened = False
        try:
            async with aclosing(self.service.events(job, ticket, record)) as events:
                async for event in events:
                    if not opened:
                        opened = True
                        opening = self.opening_choice()
                        if opening is not None:
                            yield self._chunk(job, created, opening, include_usage)
                    tokens += len(event.token_ids)
                    if event.text:
                        yield self._chunk(job, created, self.text_choice(event.text, None), include_usage)
                    if event.finished:
                        if event.stats is not None and event.stats.completion_tokens:
                            tokens = event.stats.completion_tokens
                        yield self._chunk(job, created, self.text_choice("", event.finish_reason or "stop"),
                                          include_usage)
                        if include_usage:
                            yield self._chunk(job, created, None, True, usage(len(job.prompt_ids), tokens))
        except APIError as exc:
            yield sse_frame(exc.body(job.correlation_id))
        yield DONE_FRAME
