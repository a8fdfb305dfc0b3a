"""POST /v1/responses: OpenAI's Responses API for text, on the same request flow as chat completions.

The checks, sampling parameters, admission, deadline and abort handling are `GenerationService`'s and the
chat template is `PromptBuilder`'s; this module only shapes the `response` object and its event stream:

    response.created, response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta (one per engine step with text), response.output_text.done,
    response.content_part.done, response.output_item.done, then response.completed (or
    response.incomplete when max_output_tokens or the context cut the text)

each `event: TYPE` + `data: {"type": TYPE, "sequence_number": N, ...}`, numbered from 0, with no `[DONE]`
(OpenAI sends none on this API). A failure after the stream started becomes an `error` event followed by
`response.failed`.
"""

from __future__ import annotations

import functools
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.admission import Ticket
from server.endpoint import check_text
from server.errors import APIError, bad_request
from server.prompting import PromptBuilder
from server.request_id import request_id_of
from server.schemas_responses import ResponsesRequest
from server.serving import ClientGone, GenerationService, Job
from server.streaming import SSEResponse, sse_named_event
from server.telemetry import STATUS_CLIENT_CLOSED, RequestRecord
from subspec_core.types import FINISH_LENGTH


class ResponseShape:
    """The `response` object of one request at each stage (in progress, completed, incomplete, failed)."""

    def __init__(self, request: ResponsesRequest, job: Job, *, model: str) -> None:
        self.id = job.request_id
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.prompt_tokens = len(job.prompt_ids)
        self._request = request
        self._sampling = job.sampling

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def message(self, status: str, text: str | None) -> dict[str, Any]:
        """The assistant message: no content while in progress (`text` None), one output_text part after."""
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant",
                "content": [] if text is None else [self.part(text)]}

    def response(self, status: str, *, text: str | None = None, output_tokens: int | None = None,
                 cached_tokens: int = 0, error: APIError | None = None) -> dict[str, Any]:
        """The whole object; `text` None means the message has not begun (in progress, or failed)."""
        request = self._request
        incomplete = status == "incomplete"
        output = [] if text is None else [self.message("incomplete" if incomplete else "completed", text)]
        usage = None if output_tokens is None else {
            "input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + output_tokens,
        }
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None if error is None else {"code": error.code or error.type, "message": error.message},
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "model": self.model, "output": output, "parallel_tool_calls": bool(request.parallel_tool_calls),
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": False,  # stateless: nothing is ever stored, whatever `store` asked
            "temperature": self._sampling.temperature, "top_p": self._sampling.top_p,
            "text": {"format": {"type": "text"}}, "tool_choice": request.tool_choice or "auto", "tools": [],
            "truncation": request.truncation or "disabled", "usage": usage, "user": request.user,
            "metadata": request.metadata or {},
        }

    def finished(self, text: str, finish_reason: str, output_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
        status = "incomplete" if finish_reason == FINISH_LENGTH else "completed"
        return self.response(status, text=text, output_tokens=output_tokens, cached_tokens=cached_tokens)


class _Events:
    """Numbers the events of one stream from 0, as OpenAI does."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._next, **fields}
        self._next += 1
        return sse_named_event(kind, payload)


class ResponsesEndpoint:
    """POST /v1/responses on top of the shared `GenerationService`."""

    endpoint = "/v1/responses"

    def __init__(self, service: GenerationService, prompts: PromptBuilder) -> None:
        self.service = service
        self.prompts = prompts

    @staticmethod
    def check_stateless(request: ResponsesRequest) -> None:
        """This server keeps no responses or conversations to continue."""
        if request.previous_response_id is not None:
            raise bad_request("previous_response_id is not supported: this server is stateless and stores no "
                              "responses. Send the whole conversation as `input` (a list of messages) instead.",
                              param="previous_response_id", code="unsupported_parameter")
        if request.conversation is not None:
            raise bad_request("conversation is not supported: this server is stateless. Send the whole "
                              "conversation as `input` (a list of messages) instead.",
                              param="conversation", code="unsupported_parameter")

    async def create(self, request: ResponsesRequest, raw_request: Request) -> Response:
        """Handle one request; never raises APIError (it becomes the response, and is counted)."""
        service = self.service
        record = service.metrics.start(self.endpoint)
        request_id = request_id_of(raw_request)
        headers = service.note_ignored(request.ignored_fields())
        try:
            check_text(request)
            service.check_model(request.model)
            self.check_stateless(request)
            service.check_supported(request.unsupported_parameters())
            info = service.check_ready()
            prompt_ids = await service.prepare(functools.partial(self.prompts.chat, param="input"), request.messages())
            sampling = service.sampling_params(request, prompt_len=len(prompt_ids), max_model_len=info.max_model_len,
                                               max_tokens=request.max_output_tokens,
                                               max_tokens_param="max_output_tokens", prompt_param="input")
            job = service.job(f"resp_{uuid.uuid4().hex}", prompt_ids, sampling, record, correlation_id=request_id)
            ticket = service.admit(job.request_id)
        except APIError as exc:
            record.finish(exc.status_code)
            response = exc.response(request_id)
            response.headers.update(headers)
            return response
        shape = ResponseShape(request, job, model=service.model_name)
        if request.stream:
            def on_close() -> None:  # also covers a stream that never started (client gone first)
                ticket.release()
                record.finish(STATUS_CLIENT_CLOSED)

            return SSEResponse(self._stream(job, ticket, record, shape), on_close=on_close, headers=headers)
        try:
            result = await service.collect(job, ticket, record, raw_request)
        except APIError as exc:  # already counted by events()
            return exc.response(request_id)
        except ClientGone:
            return Response(status_code=STATUS_CLIENT_CLOSED)
        finally:
            ticket.release()
        cached = result.stats.cached_prompt_tokens if result.stats is not None else 0
        return JSONResponse(shape.finished(result.text, result.finish_reason, result.completion_tokens, cached),
                            headers=headers)

    async def _stream(self, job: Job, ticket: Ticket, record: RequestRecord,
                      shape: ResponseShape) -> AsyncIterator[bytes]:
        """The Responses event sequence. The opening events go out at once, before the request has even
        reached the engine, so a client sees its response id while it waits in the queue."""
        event = _Events()
        where = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
        yield event("response.created", response=shape.response("in_progress"))
        yield event("response.in_progress", response=shape.response("in_progress"))
        yield event("response.output_item.added", output_index=0, item=shape.message("in_progress", None))
        yield event("response.content_part.added", **where, part=shape.part(""))
        pieces: list[str] = []
        tokens = 0
        finish_reason = "stop"
        cached = 0
        try:
            async with aclosing(self.service.events(job, ticket, record)) as events:
                async for step in events:
                    tokens += len(step.token_ids)
                    if step.text:
                        pieces.append(step.text)
                        yield event("response.output_text.delta", **where, delta=step.text, logprobs=[])
                    if step.finished:
                        finish_reason = step.finish_reason or "stop"
                        if step.stats is not None:
                            tokens = step.stats.completion_tokens or tokens
                            cached = step.stats.cached_prompt_tokens
        except APIError as exc:
            yield event("error", code=exc.code or exc.type, message=exc.message, param=exc.param)
            yield event("response.failed", response=shape.response("failed", error=exc))
            return
        text = "".join(pieces)
        final = shape.finished(text, finish_reason, tokens, cached)
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=shape.part(text))
        yield event("response.output_item.done", output_index=0, item=final["output"][0])
        yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
