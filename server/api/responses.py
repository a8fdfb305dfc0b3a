"""POST /v1/responses: OpenAI's Responses API for text, on the request flow every endpoint takes.

The checks, sampling parameters, admission, deadline and abort handling are `Endpoint`'s and the chat template
is `PromptBuilder`'s; this module only shapes the `response` object and its event stream:

    response.created, response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta (one per engine step with text), response.output_text.done,
    response.content_part.done, response.output_item.done, then response.completed (or
    response.incomplete when max_output_tokens or the context cut the text)

each `event: TYPE` + `data: {"type": TYPE, "sequence_number": N, ...}`, numbered from 0, with no `[DONE]`
(OpenAI sends none on this API). A failure after the stream started becomes an `error` event followed by
`response.failed`.
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from server.api.endpoint import Endpoint, EventStream, Prepared
from server.api.errors import APIError, bad_request
from server.api.prompting import PromptBuilder
from server.api.schemas_responses import ResponsesRequest
from server.api.structured import checked, request_constraint
from server.api.sse import sse_named_event
from server.worker.runner import Completion, Job
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
            "text": {"format": self._text_format()}, "tool_choice": request.tool_choice or "auto", "tools": [],
            "truncation": request.truncation or "disabled", "usage": usage, "user": request.user,
            "metadata": request.metadata or {},
        }

    def _text_format(self) -> dict[str, Any]:
        """The request's `text.format` as OpenAI echoes it (`text` when it set none)."""
        text = self._request.text
        if text is None or text.format is None:
            return {"type": "text"}
        return text.format.model_dump()

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


class ResponsesEndpoint(Endpoint):
    """POST /v1/responses."""

    endpoint = "/v1/responses"
    id_prefix = "resp_"
    prompt_param = "input"

    def check(self, request: ResponsesRequest) -> None:
        """This server keeps no responses or conversations to continue."""
        if request.previous_response_id is not None:
            raise bad_request("previous_response_id is not supported: this server is stateless and stores no "
                              "responses. Send the whole conversation as `input` (a list of messages) instead.",
                              param="previous_response_id", code="unsupported_parameter")
        if request.conversation is not None:
            raise bad_request("conversation is not supported: this server is stateless. Send the whole "
                              "conversation as `input` (a list of messages) instead.",
                              param="conversation", code="unsupported_parameter")

    def prepare(self, request: ResponsesRequest, prompts: PromptBuilder, max_model_len: int) -> Prepared:
        constraint = checked(request_constraint(request))
        prompt_ids = prompts.chat(request.messages(), param="input", max_model_len=max_model_len)
        return Prepared(prompt_ids, None, request.max_output_tokens, "max_output_tokens", constraint=constraint)

    def _shape(self, request: ResponsesRequest, job: Job) -> ResponseShape:
        return ResponseShape(request, job, model=self.context.model_name)

    def body(self, request: ResponsesRequest, job: Job, prepared: Prepared, result: Completion) -> dict[str, Any]:
        cached = result.stats.cached_prompt_tokens if result.stats is not None else 0
        return self._shape(request, job).finished(result.text, result.finish_reason, result.completion_tokens, cached)

    def stream(self, request: ResponsesRequest, job: Job, prepared: Prepared) -> EventStream:
        return _ResponseStream(self, job, self._shape(request, job))


class _ResponseStream(EventStream):
    """The Responses event sequence. The opening events go out at once, before the request has even reached
    the engine, so a client sees its response id while it waits in the queue."""

    def __init__(self, endpoint: ResponsesEndpoint, job: Job, shape: ResponseShape) -> None:
        self._endpoint = endpoint
        self._job = job
        self._shape = shape
        self._event = _Events()

    async def frames(self) -> AsyncIterator[bytes]:
        event, shape = self._event, self._shape
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
            async with aclosing(self._endpoint.context.runner.events(self._job)) as events:
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
            for frame in self.failure(exc):
                yield frame
            return
        text = "".join(pieces)
        final = shape.finished(text, finish_reason, tokens, cached)
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=shape.part(text))
        yield event("response.output_item.done", output_index=0, item=final["output"][0])
        yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)

    def failure(self, error: APIError) -> list[bytes]:
        return [self._event("error", code=error.code or error.type, message=error.message, param=error.param),
                self._event("response.failed", response=self._shape.response("failed", error=error))]
