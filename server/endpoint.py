"""The shared HTTP flow of the completion endpoints, and how their results are framed.

`OpenAIEndpoint.create` runs the checks, admits the request, then either streams SSE chunks or returns
one JSON body; subclasses (`serving_chat`, `serving_completion`) prepare the prompt and a `ChoiceBuilder`
that turns the request's token events into choices. A whole (non-streamed) choice is the fold of the same
per-event deltas, so streamed and non-streamed responses always agree.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.admission import Ticket
from server.errors import APIError
from server.logprobs import TokenStrings
from server.prompting import PromptBuilder
from server.request_id import request_id_of
from server.serving import ClientGone, GenerationService, Job, usage
from server.streaming import DONE_FRAME, SSEResponse, sse_frame
from server.telemetry import STATUS_CLIENT_CLOSED, RequestRecord
from server.text_fields import invalid_text_field
from subspec_core.types import TokenEvent


class ChoiceBuilder(ABC):
    """One request's choice, built from its token events: a streamed delta per event, then the whole."""

    def opening(self) -> dict[str, Any] | None:
        """The choice of a chunk sent before any text (chat: the role), or None."""
        return None

    @abstractmethod
    def on_event(self, event: TokenEvent) -> dict[str, Any] | None:
        """The streamed choice for one event (None: nothing to send yet)."""

    @abstractmethod
    def closing(self, finish_reason: str) -> list[dict[str, Any]]:
        """The last streamed choices (anything held back, then the one with the final finish_reason)."""

    @abstractmethod
    def whole(self) -> dict[str, Any]:
        """The non-streamed choice (after every event and `closing`)."""


@dataclass(frozen=True)
class Prepared:
    """What an endpoint made of a request: prompt ids, decoding options, and the choice builder."""

    prompt_ids: list[int]
    builder: ChoiceBuilder
    max_tokens: int | None  # None: fill the context
    max_tokens_param: str
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int = 1  # 0 where max_tokens 0 makes sense (echo)


class OpenAIEndpoint(ABC):
    """One completion endpoint: the shared request flow, with endpoint-specific prompt and body shapes.

    Checks run in this order: valid Unicode (400), model (404), unsupported parameters (400), worker ready
    or shutting down (503), prompt and context window (400, prepared on the prompt thread), queue (429).
    Nothing is queued until every check has passed.
    """

    endpoint: str  # metrics label, e.g. "/v1/chat/completions"
    id_prefix: str  # "chatcmpl" / "cmpl"
    chunk_object: str  # the `object` of streamed chunks
    body_object: str  # the `object` of a whole response
    prompt_param: str

    def __init__(self, service: GenerationService, prompts: PromptBuilder, strings: TokenStrings) -> None:
        self.service = service
        self.prompts = prompts
        self.strings = strings  # token text and bytes, for logprobs

    @abstractmethod
    def prepare(self, request: Any) -> Prepared:
        """Endpoint-specific checks (400), the prompt ids and the choice builder."""

    # -- shared flow ------------------------------------------------------------------------------------
    async def create(self, request: Any, raw_request: Request) -> Response:
        """Handle one request; never raises APIError (it becomes the response, and is counted)."""
        service = self.service
        record = service.metrics.start(self.endpoint)
        headers = service.note_ignored(request.ignored_fields())
        try:
            check_text(request)
            service.check_model(request.model)
            service.check_supported(request.unsupported_parameters())
            info = service.check_ready()
            prepared = await service.prepare(self.prepare, request)
            sampling = service.sampling_params(
                request, prompt_len=len(prepared.prompt_ids), max_model_len=info.max_model_len,
                max_tokens=prepared.max_tokens, max_tokens_param=prepared.max_tokens_param,
                prompt_param=self.prompt_param, logprobs=prepared.logprobs,
                prompt_logprobs=prepared.prompt_logprobs, min_tokens=prepared.min_tokens)
            job = service.job(f"{self.id_prefix}-{uuid.uuid4().hex}", prepared.prompt_ids, sampling, record,
                              correlation_id=request_id_of(raw_request))
            ticket = service.admit(job.request_id)
        except APIError as exc:
            record.finish(exc.status_code)
            response = exc.response(request_id_of(raw_request))
            response.headers.update(headers)
            return response
        created = int(time.time())
        builder = prepared.builder
        if request.stream:
            def on_close() -> None:  # also covers a stream that never started (client gone first)
                ticket.release()
                record.finish(STATUS_CLIENT_CLOSED)

            body = self._stream(job, ticket, record, created, builder, request.include_usage(),
                                request.continuous_usage())
            return SSEResponse(body, on_close=on_close, headers=headers)
        try:
            result = await service.collect(job, ticket, record, raw_request)
        except APIError as exc:  # already counted by events()
            response = exc.response(job.correlation_id)
            response.headers.update(headers)
            return response
        except ClientGone:
            return Response(status_code=STATUS_CLIENT_CLOSED)
        finally:
            ticket.release()
        for event in result.events:
            builder.on_event(event)
        builder.closing(result.finish_reason)
        body = {"id": job.request_id, "object": self.body_object, "created": created,
                "model": service.model_name, "choices": [builder.whole()],
                "usage": usage(len(job.prompt_ids), result.completion_tokens, result.stats),
                "system_fingerprint": None}
        return JSONResponse(body, headers=headers)

    def _chunk(self, job: Job, created: int, choice: dict[str, Any] | None, with_usage: bool,
               usage_value: dict[str, Any] | None = None) -> bytes:
        payload: dict[str, Any] = {"id": job.request_id, "object": self.chunk_object, "created": created,
                                   "model": self.service.model_name, "system_fingerprint": None,
                                   "choices": [] if choice is None else [choice]}
        if with_usage:
            payload["usage"] = usage_value
        return sse_frame(payload)

    async def _stream(self, job: Job, ticket: Ticket, record: RequestRecord, created: int, builder: ChoiceBuilder,
                      include_usage: bool, continuous_usage: bool) -> AsyncIterator[bytes]:
        """SSE frames: [opening chunk], a chunk per event with something to say, the closing chunk(s),
        [usage], [DONE]. With continuous usage every chunk carries the usage so far. A failure mid-stream
        becomes an `{"error": ...}` event (the HTTP status is already 200)."""
        prompt_tokens = len(job.prompt_ids)
        tokens = 0
        opened = False
        with_usage = include_usage or continuous_usage

        def chunk(choice: dict[str, Any] | None) -> bytes:
            return self._chunk(job, created, choice, with_usage,
                               usage(prompt_tokens, tokens) if continuous_usage else None)

        try:
            async with aclosing(self.service.events(job, ticket, record)) as events:
                async for event in events:
                    if not opened:
                        opened = True
                        opening = builder.opening()
                        if opening is not None:
                            yield chunk(opening)
                    tokens += len(event.token_ids)
                    choice = builder.on_event(event)
                    if choice is not None:
                        yield chunk(choice)
                    if event.finished:
                        if event.stats is not None and event.stats.completion_tokens:
                            tokens = event.stats.completion_tokens
                        for choice in builder.closing(event.finish_reason or "stop"):
                            yield chunk(choice)
                        if include_usage:
                            yield self._chunk(job, created, None, True, usage(prompt_tokens, tokens, event.stats))
        except APIError as exc:
            yield sse_frame(exc.body(job.correlation_id))
        yield DONE_FRAME


def check_text(request: Any) -> None:
    """400 naming the first field whose text is not valid Unicode (a lone UTF-16 surrogate)."""
    field = invalid_text_field(request)
    if field is not None:
        raise APIError(400, f"'{field}' is not valid Unicode: it contains a lone UTF-16 surrogate (an unpaired "
                            f"\\uD800-\\uDFFF escape)", param=field, code="invalid_unicode")
